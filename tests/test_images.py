"""sd3trt.runtime.images: diffusers parity, every input mode, error paths, atomic output."""

from __future__ import annotations

import io
import os
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from sd3trt.errors import Sd3trtError
from sd3trt.runtime import images as I


def rand_rgb(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def encoded(im, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def px(im, xy):
    return tuple(int(v) for v in im.getpixel(xy))


def assert_clean_error(excinfo, *words):
    """One line naming the problem, and no Pillow exception chained on (no traceback from inside Pillow)."""
    e = excinfo.value
    msg = str(e)
    assert "\n" not in msg and msg
    assert e.__cause__ is None and (e.__context__ is None or e.__suppress_context__)
    for w in words:
        assert w.lower() in msg.lower(), (w, msg)


@pytest.fixture(scope="module")
def vp():
    pytest.importorskip("torch")
    ip = pytest.importorskip("diffusers.image_processor")
    return ip.VaeImageProcessor(vae_scale_factor=8, vae_latent_channels=16)


# ------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("src, target", [
    ((64, 48), (64, 48)),     # no resize
    ((100, 75), (96, 64)),    # downscale, non-square
    ((37, 91), (32, 80)),     # tall, odd source
    ((40, 24), (128, 96)),    # upscale
    ((80, 80), (83, 61)),     # target not a multiple of 8: diffusers floors it
])
def test_preprocess_matches_diffusers(vp, src, target):
    im = rand_rgb(*src, seed=sum(src))
    ref = vp.preprocess(im, height=target[1], width=target[0]).numpy()
    ours = I.preprocess(im, *target)
    assert ours.dtype == np.float32 and ours.flags.c_contiguous
    assert ours.shape == ref.shape
    np.testing.assert_array_equal(ours, ref)
    assert ours.min() >= -1.0 and ours.max() <= 1.0


def test_preprocess_batch_and_defaults_match_diffusers(vp):
    ims = [rand_rgb(72, 56, seed=1), rand_rgb(50, 90, seed=2)]
    ref = vp.preprocess(ims, height=48, width=64).numpy()
    np.testing.assert_array_equal(I.preprocess(ims, 64, 48), ref)
    np.testing.assert_array_equal(I.preprocess(tuple(ims), 64, 48), ref)
    im = rand_rgb(70, 45, seed=3)  # no size given: the image's own, floored to 8
    np.testing.assert_array_equal(I.preprocess(im), vp.preprocess(im).numpy())


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_postprocess_matches_diffusers(vp, dtype):
    import torch

    rng = np.random.default_rng(5)
    x = (rng.standard_normal((2, 3, 40, 24)) * 0.8).astype(dtype)
    x[0, 0, 0, :4] = [-5, 5, np.inf, -np.inf]
    ref = vp.postprocess(torch.from_numpy(x), output_type="pil")
    ours = I.postprocess(x)
    assert len(ours) == 2
    for a, b in zip(ours, ref):
        assert a.mode == b.mode == "RGB" and a.size == b.size == (24, 40)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_postprocess_rounding_boundaries_match_diffusers(vp):
    """Every float16 in [-1.1, 1.1], and float32s one ulp either side of each k + 0.5 rounding edge."""
    import torch

    h = np.arange(0, 2**16, dtype=np.uint16).view(np.float16)
    h = h[np.isfinite(h) & (np.abs(h) <= 1.1)]
    edges = ((np.arange(255, dtype=np.float64) + 0.5) / 255 - 0.5) * 2
    f = np.concatenate([np.nextafter(edges.astype(np.float32), np.float32(k)) for k in (-2, 0, 2)] +
                       [edges.astype(np.float32)])
    for arr in (h, f):
        n = arr.size + (-arr.size) % 3
        x = np.resize(arr, n).reshape(1, 3, 1, n // 3)
        ref = np.asarray(vp.postprocess(torch.from_numpy(x), output_type="pil")[0])
        np.testing.assert_array_equal(np.asarray(I.postprocess(x)[0]), ref)


def test_postprocess_shapes_and_nan():
    x = np.zeros((3, 8, 16), np.float32)
    x[0, 0, 0] = np.nan
    (im,) = I.postprocess(x)  # [3, H, W] is one image
    assert im.size == (16, 8) and im.mode == "RGB" and px(im, (0, 0)) == (0, 128, 128)
    (g,) = I.postprocess(np.ones((1, 1, 4, 4), np.float32))
    assert g.mode == "L" and g.getpixel((0, 0)) == 255
    with pytest.raises(ValueError):
        I.postprocess(np.zeros((1, 4, 8, 8), np.float32))
    with pytest.raises(TypeError):
        I.postprocess(np.zeros((1, 3, 8, 8), np.uint8))


def test_pre_post_roundtrip_is_lossless():
    im = rand_rgb(48, 32, seed=9)
    (back,) = I.postprocess(I.preprocess(im, 48, 32))
    np.testing.assert_array_equal(np.asarray(back), np.asarray(im))


# ------------------------------------------------------------------------------------------ inputs


def test_sources_path_bytes_stream_and_pil(tmp_path):
    im = rand_rgb(40, 30)
    data = encoded(im)
    p = tmp_path / "in.png"
    p.write_bytes(data)
    stream = io.BytesIO(data)
    for src in (p, str(p), data, bytearray(data), memoryview(data), stream, im):
        out = I.load_image(src)
        assert out.mode == "RGB" and out.size == (40, 30)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(im))
    assert not stream.closed  # a caller's stream is left open
    assert I.load_image(im) is not im  # always a new image


def test_rgba_composited_over_white():
    a = np.zeros((4, 4, 4), np.uint8)
    a[0, 0] = (200, 10, 20, 255)  # opaque
    a[0, 1] = (0, 0, 0, 0)        # transparent black -> white
    a[0, 2] = (0, 0, 0, 128)      # half black over white
    im = Image.frombytes("RGBA", (4, 4), a.tobytes())
    for src in (im, encoded(im)):
        out = I.load_image(src)
        assert out.mode == "RGB"
        assert px(out, (0, 0)) == (200, 10, 20)
        assert px(out, (1, 0)) == (255, 255, 255)
        assert all(126 <= c <= 128 for c in px(out, (2, 0)))
    assert im.mode == "RGBA" and px(im, (1, 0)) == (0, 0, 0, 0)  # the caller's image is untouched


def test_la_and_palette_transparency():
    la = Image.frombytes("LA", (2, 1), bytes([50, 255, 0, 0]))
    out = I.load_image(encoded(la))
    assert px(out, (0, 0)) == (50, 50, 50) and px(out, (1, 0)) == (255, 255, 255)

    p = Image.new("P", (3, 1))
    p.putpalette([255, 0, 0, 0, 0, 255, 0, 255, 0] + [0] * (256 * 3 - 9))
    p.putdata([0, 1, 2])
    for fmt in ("PNG", "GIF"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no Pillow palette-transparency warning either
            out = I.load_image(encoded(p, fmt, transparency=1))
        assert [px(out, (i, 0)) for i in range(3)] == [(255, 0, 0), (255, 255, 255), (0, 255, 0)], fmt
    out = I.load_image(encoded(p))  # palette without transparency
    assert px(out, (1, 0)) == (0, 0, 255)

    pa = Image.new("PA", (1, 1))
    pa.putpalette([10, 20, 30] + [0] * 765)
    pa.putpixel((0, 0), (0, 0))
    assert px(I.load_image(pa), (0, 0)) == (255, 255, 255)


def test_grayscale_and_bilevel():
    g = Image.fromarray(np.array([[0, 77, 255]], np.uint8))
    assert [px(I.load_image(encoded(g)), (i, 0)) for i in range(3)] == [(0,) * 3, (77,) * 3, (255,) * 3]
    bw = Image.new("1", (2, 1))
    bw.putpixel((1, 0), 1)
    out = I.load_image(encoded(bw))
    assert px(out, (0, 0)) == (0, 0, 0) and px(out, (1, 0)) == (255, 255, 255)


def test_16bit_gray_is_scaled_not_clipped():
    vals = np.array([[0, 1000, 128 * 257, 65535]], np.uint16)  # 1000/257 = 3.9 -> 4
    im = Image.fromarray(vals)
    assert im.mode == "I;16"
    expect = [0, 4, 128, 255]
    for src in (im, encoded(im), encoded(im, "TIFF"), im.convert("I")):
        out = I.load_image(src)
        assert [out.getpixel((i, 0))[0] for i in range(4)] == expect
    pgm = b"P5\n4 1\n65535\n" + vals.astype(">u2").tobytes()  # Pillow opens this as mode I
    out = I.load_image(pgm)
    assert [out.getpixel((i, 0))[0] for i in range(4)] == expect


def test_16bit_gray_with_transparency_key():
    im = Image.fromarray(np.array([[65535, 0]], np.uint16))
    out = I.load_image(encoded(im, transparency=0))
    assert px(out, (0, 0)) == (255, 255, 255) and px(out, (1, 0)) == (255, 255, 255)
    out = I.load_image(encoded(im))
    assert px(out, (1, 0)) == (0, 0, 0)


def test_float_and_wide_int_modes():
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0, np.nan]], np.float32))
    assert f.mode == "F"
    assert [I.load_image(f).getpixel((i, 0))[0] for i in range(4)] == [0, 128, 255, 0]
    f255 = Image.fromarray(np.array([[0.0, 100.0, 255.0]], np.float32))
    assert [I.load_image(f255).getpixel((i, 0))[0] for i in range(3)] == [0, 100, 255]
    wide = Image.fromarray(np.array([[-1000, 0, 1000]], np.int32))  # outside 0..65535: stretched
    assert [I.load_image(wide).getpixel((i, 0))[0] for i in range(3)] == [0, 128, 255]


def test_cmyk():
    c = Image.new("CMYK", (2, 1))
    c.putpixel((0, 0), (0, 0, 0, 0))
    c.putpixel((1, 0), (255, 0, 0, 0))
    for src in (c, encoded(c, "TIFF")):
        out = I.load_image(src)
        assert px(out, (0, 0)) == (255, 255, 255) and px(out, (1, 0)) == (0, 255, 255)
    out = I.load_image(encoded(c, "JPEG", quality=100))
    assert np.abs(np.asarray(out, np.int16) - [[[255, 255, 255], [0, 255, 255]]]).max() <= 8


def test_exif_orientation_applied():
    im = Image.new("RGB", (32, 16), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 16, 16))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
    data = encoded(im, "JPEG", quality=95, exif=exif.tobytes())
    out = I.load_image(data)
    assert out.size == (16, 32)
    r, g, b = px(out, (8, 6))  # left half ends up on top
    assert r > 200 and b < 60
    r, g, b = px(out, (8, 26))
    assert b > 200 and r < 60
    assert I.load_image(Image.open(io.BytesIO(data))).size == (16, 32)  # a caller-opened image too


# ------------------------------------------------------------------------------------------ errors


def test_non_image_and_empty_bytes(tmp_path):
    with pytest.raises(Sd3trtError) as ei:
        I.load_image(b"this is not an image at all")
    assert_clean_error(ei, "not a readable image")
    with pytest.raises(Sd3trtError) as ei:
        I.load_image(b"")
    assert_clean_error(ei, "empty")
    p = tmp_path / "notes.png"
    p.write_text("hello")
    with pytest.raises(Sd3trtError) as ei:
        I.load_image(p)
    assert_clean_error(ei, "notes.png", "not a readable image")


def test_truncated_png():
    data = encoded(rand_rgb(64, 64))
    with pytest.raises(Sd3trtError) as ei:
        I.load_image(data[: len(data) // 2])
    assert_clean_error(ei, "truncated or corrupt")
    with pytest.raises(Sd3trtError):
        I.load_image(data[:20])  # inside the header


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(Sd3trtError) as ei:
        I.load_image(tmp_path / "nope.png")
    assert_clean_error(ei, "nope.png", "does not exist")
    with pytest.raises(Sd3trtError) as ei:
        I.load_image(tmp_path)
    assert_clean_error(ei, "directory")


def _png_header(w, h):
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def test_zero_size():
    with pytest.raises(Sd3trtError) as ei:
        I.load_image(Image.new("RGB", (0, 5)))
    assert_clean_error(ei, "zero size")
    with pytest.raises(Sd3trtError):
        I.load_image(_png_header(0, 10))


def test_pixel_limit_checked_from_header():
    im = rand_rgb(20, 20)
    with pytest.raises(Sd3trtError) as ei:
        I.load_image(encoded(im), max_pixels=399)
    assert_clean_error(ei, "20x20", "399", "max_pixels")
    assert I.load_image(encoded(im), max_pixels=400).size == (20, 20)
    with pytest.raises(Sd3trtError):
        I.load_image(im, max_pixels=100)
    # A header claiming 50000 x 50000 with no pixel data: refused before any decoding.
    with pytest.raises(Sd3trtError) as ei:
        I.load_image(_png_header(50000, 50000))
    assert_clean_error(ei, "2,500,000,000 pixels", f"{I.DEFAULT_MAX_PIXELS:,}", "max_pixels")
    with pytest.raises(Sd3trtError) as ei:  # under Pillow's own limits: our header check
        I.load_image(_png_header(5000, 5000))
    assert_clean_error(ei, "5000x5000", f"{I.DEFAULT_MAX_PIXELS:,}", "max_pixels")
    with pytest.raises(Sd3trtError):
        I.load_image(encoded(im), max_pixels=0)


def test_pillow_bomb_guard_becomes_our_error(monkeypatch):
    data = encoded(rand_rgb(20, 20))  # 400 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 150)  # Pillow errors above 300, warns above 150
    with pytest.raises(Sd3trtError) as ei:
        I.load_image(data, max_pixels=None)
    assert_clean_error(ei, "400 pixels", "decompression-bomb", "300", "MAX_IMAGE_PIXELS")
    with pytest.raises(Sd3trtError) as ei:
        I.load_image(data, max_pixels=100)
    assert_clean_error(ei, "100", "max_pixels")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 250)  # 400 is in Pillow's warning band
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert I.load_image(data, max_pixels=1000).size == (20, 20)  # allowed: no warning escapes
        with pytest.raises(Sd3trtError) as ei:
            I.load_image(data, max_pixels=300)
    assert_clean_error(ei, "20x20", "300")


def test_unsupported_source_type():
    with pytest.raises(Sd3trtError) as ei:
        I.load_image(np.zeros((4, 4, 3), np.uint8))
    assert_clean_error(ei, "ndarray", "PIL image")


def test_target_size():
    assert I.target_size(1023, 769) == (1008, 768)
    assert I.target_size(16, 16) == (16, 16)
    assert I.target_size(100, 60, multiple=8) == (96, 56)
    with pytest.raises(Sd3trtError) as ei:
        I.target_size(15, 100)
    assert_clean_error(ei, "15x100", "16")
    with pytest.raises(Sd3trtError) as ei:
        I.target_size(2048, 512, max_side=1024)
    assert_clean_error(ei, "1024")
    assert I.target_size(1030, 512, max_side=1024) == (1024, 512)  # checked after flooring


def test_pixels_have_the_plans_size_on_a_vae_factor_other_than_8(tiny_factory):
    """A model whose VAE downsamples by 2 (make-tiny --vae-levels 2): sides are floored to its pixel multiple
    (4), the pixels are that size, as diffusers' image processor with the model's factor makes them, and
    img2img runs at that size."""
    from diffusers.image_processor import VaeImageProcessor

    from sd3trt.runtime.pipeline import Img2Img
    from sd3trt.runtime.plan import read_image
    from sd3trt.spec import read_model_facts

    model, bundle = tiny_factory("vae2")
    facts = read_model_facts(model)
    assert (facts.vae_scale_factor, facts.pixel_multiple) == (2, 4)
    im = rand_rgb(86, 54)
    pixels, size, (w, h) = read_image(im, facts, None)
    assert size == (86, 54) and (w, h) == (84, 52)
    assert pixels.shape == (1, 3, 52, 84)
    ref = VaeImageProcessor(vae_scale_factor=2).preprocess(im, height=52, width=84).numpy()
    np.testing.assert_array_equal(pixels, ref)
    with Img2Img.from_bundle(bundle) as pipe:
        plan = pipe.prepare(im, "a cat", steps=2, seed=0)
        assert (plan.width, plan.height) == (84, 52) and plan.latent_shape[2:] == (26, 42)
        assert pipe.run(plan).array.shape == (1, 52, 84, 3)


# ------------------------------------------------------------------------------------------ outputs


@pytest.mark.parametrize("fmt, pil", [("png", "PNG"), ("PNG", "PNG"), ("jpeg", "JPEG"), ("JPG", "JPEG"),
                                      ("jpg", "JPEG"), ("webp", "WEBP"), ("WebP", "WEBP")])
def test_encode_formats(fmt, pil):
    im = rand_rgb(32, 24)
    data = I.encode_image(im, fmt)
    back = Image.open(io.BytesIO(data))
    assert back.format == pil and back.size == (32, 24)
    if pil == "PNG":
        np.testing.assert_array_equal(np.asarray(back), np.asarray(im))


def test_encode_quality_and_alpha():
    im = rand_rgb(64, 64)
    assert len(I.encode_image(im, "jpeg", quality=30)) < len(I.encode_image(im, "jpeg", quality=95))
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    back = Image.open(io.BytesIO(I.encode_image(rgba, "jpeg")))  # JPEG has no alpha: over white
    assert back.mode == "RGB" and min(back.getpixel((4, 4))) > 245
    with pytest.raises(Sd3trtError) as ei:
        I.encode_image(im, "jpeg", quality=0)
    assert_clean_error(ei, "quality")


def test_unknown_output_format(tmp_path):
    with pytest.raises(Sd3trtError) as ei:
        I.encode_image(rand_rgb(8, 8), "gif")
    assert_clean_error(ei, "gif", "png", "jpeg", "webp")
    with pytest.raises(Sd3trtError) as ei:
        I.format_from_path(tmp_path / "out.bmp")
    assert_clean_error(ei, ".bmp", ".png", ".jpg", ".webp")
    with pytest.raises(Sd3trtError):
        I.format_from_path("out")
    with pytest.raises(Sd3trtError):
        I.save_image(rand_rgb(8, 8), tmp_path / "out.tiff")
    assert list(tmp_path.iterdir()) == []


def test_format_from_path():
    assert I.format_from_path("a/b.PNG") == "png"
    assert I.format_from_path("x.jpg") == I.format_from_path("x.JPEG") == "jpeg"
    assert I.format_from_path("x.webp") == "webp"
    assert set(I.OUTPUT_FORMATS) == {"png", "jpeg", "webp"}


def test_save_image(tmp_path):
    im = rand_rgb(24, 16)
    for name, pil in (("a.png", "PNG"), ("b.JPG", "JPEG"), ("c.webp", "WEBP")):
        assert I.save_image(im, tmp_path / name) == tmp_path / name
        with Image.open(tmp_path / name) as back:
            assert back.format == pil and back.size == (24, 16)
    I.save_image(im, tmp_path / "d.png", fmt="jpeg")  # an explicit format wins
    with Image.open(tmp_path / "d.png") as back:
        assert back.format == "JPEG"
    I.save_image(rand_rgb(24, 16, seed=1), tmp_path / "a.png")  # overwrite
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(rand_rgb(24, 16, seed=1)))
    from sd3trt.files import _umask

    mask = _umask()
    assert (tmp_path / "a.png").stat().st_mode & 0o777 == 0o666 & ~mask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.JPG", "c.webp", "d.png"]


def test_save_failing_encode_leaves_nothing(tmp_path, monkeypatch):
    old = tmp_path / "keep.png"
    old.write_bytes(b"previous contents")

    def broken_save(self, fp, format=None, **kw):
        fp.write(b"partial")
        raise OSError("encoder exploded")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(Sd3trtError) as ei:
        I.save_image(rand_rgb(8, 8), tmp_path / "new.png")
    assert_clean_error(ei, "encode")
    with pytest.raises(Sd3trtError):
        I.save_image(rand_rgb(8, 8), old)
    assert old.read_bytes() == b"previous contents"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.png"]


def test_save_failing_write_leaves_nothing(tmp_path, monkeypatch):
    old = tmp_path / "keep.png"
    old.write_bytes(b"previous contents")

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    for target in (old, tmp_path / "new.png"):
        with pytest.raises(Sd3trtError) as ei:
            I.save_image(rand_rgb(8, 8), target)
        assert_clean_error(ei, "No space left")
    assert old.read_bytes() == b"previous contents"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.png"]


def test_save_bad_destination(tmp_path):
    with pytest.raises(Sd3trtError) as ei:
        I.save_image(rand_rgb(8, 8), tmp_path / "missing" / "o.png")
    assert_clean_error(ei, "does not exist")
    (tmp_path / "d.png").mkdir()
    with pytest.raises(Sd3trtError) as ei:
        I.save_image(rand_rgb(8, 8), tmp_path / "d.png")
    assert_clean_error(ei, "directory")

"""The runtime as a user meets it: the CLI, bad input, and its dependency promise."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sd3trt.errors import Sd3trtError
from sd3trt.runtime.pipeline import Img2Img, Noise


def sd3trt(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "sd3trt.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture()
def input_png(tmp_path):
    path = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(path)
    return path


def test_cli_img2img_with_noise_file(tiny_sd3, tmp_path, input_png):
    _, bundle = tiny_sd3
    rng = np.random.default_rng(1)
    noise = tmp_path / "noise.npz"
    np.savez(noise, latents=rng.standard_normal((2, 16, 8, 10), dtype=np.float32),
             posterior=rng.standard_normal((1, 16, 8, 10), dtype=np.float32))
    out = tmp_path / "out.webp"
    r = sd3trt("img2img", "--bundle", bundle, "--image", input_png, "--prompt", "a cat", "--steps", 3,
               "--noise", noise, "--num-images", 2, "--out", out)
    assert r.returncode == 0, r.stderr
    assert "denoising" in r.stderr and "2/2" in r.stderr  # strength 0.6 of 3 steps runs 2
    for p in (tmp_path / "out-0.webp", tmp_path / "out-1.webp"):
        with Image.open(p) as im:
            assert im.format == "WEBP" and im.size == (80, 64)
    # The same noise through the Python API gives the same pixels (webp is lossy: compare via png).
    pipe = Img2Img.from_bundle(bundle)
    with np.load(noise) as z:
        res = pipe(input_png, "a cat", steps=3, num_images=2, noise=Noise(z["latents"], z["posterior"]))
    r = sd3trt("img2img", "--bundle", bundle, "--image", input_png, "--prompt", "a cat", "--steps", 3,
               "--noise", noise, "--num-images", 2, "--out", tmp_path / "o.png")
    assert r.returncode == 0, r.stderr
    assert np.array_equal(np.asarray(Image.open(tmp_path / "o-1.png")), np.asarray(res.images[1]))


def _bundle_copy(bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    return copy


def test_cli_bad_inputs_leave_no_output(tiny_sd3, tmp_path, input_png):
    _, bundle = tiny_sd3
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not an image")
    old_version = _bundle_copy(bundle, tmp_path)
    m = json.loads((old_version / "manifest.json").read_text())
    m["format_version"] = 0
    (old_version / "manifest.json").write_text(json.dumps(m))
    no_engine = tmp_path / "b2"
    shutil.copytree(bundle, no_engine)
    (no_engine / "onnx" / "transformer.onnx").unlink()
    bad_noise = tmp_path / "n.npz"
    np.savez(bad_noise, latents=np.zeros((1, 16, 4, 4), np.float32))
    base = ["img2img", "--bundle", bundle, "--image", input_png, "--prompt", "x", "--steps", 2]
    cases = [
        (["img2img", "--bundle", bundle, "--image", junk, "--prompt", "x"], "not a readable image"),
        (["img2img", "--bundle", bundle, "--image", tmp_path / "nope.png", "--prompt", "x"], "nope.png"),
        (base + ["--strength", "1.5"], "strength"),
        (base + ["--strength", "-0.1"], "strength"),
        (base + ["--steps", "0"], "steps"),
        (base + ["--max-pixels", "100"], "pixels"),
        (base + ["--noise", bad_noise], "noise 'latents' has shape"),
        (["img2img", "--bundle", old_version, "--image", input_png, "--prompt", "x"], "format version 0"),
        (["img2img", "--bundle", no_engine, "--image", input_png, "--prompt", "x"], "transformer.onnx is missing"),
        (["img2img", "--bundle", tmp_path, "--image", input_png, "--prompt", "x"], "not an sd3trt bundle"),
    ]
    for i, (args, message) in enumerate(cases):
        out = tmp_path / f"out{i}.png"
        r = sd3trt(*args, "--out", out)
        assert r.returncode == 2, (args, r.stderr)
        assert message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        assert not out.exists()
    r = sd3trt(*base, "--out", tmp_path / "out.gif")
    assert r.returncode == 2 and "gif" in r.stderr.lower() and not (tmp_path / "out.gif").exists()


def test_api_rejects_bad_requests(tiny_sd3):
    _, bundle = tiny_sd3
    pipe = Img2Img.from_bundle(bundle)
    img = Image.new("RGB", (64, 64))
    with pytest.raises(Sd3trtError, match="no denoising step"):
        pipe(img, "x", strength=0.0, steps=4)
    with pytest.raises(Sd3trtError, match="max_sequence_length"):
        pipe(img, "x", max_sequence_length=513)
    with pytest.raises(Sd3trtError, match="num_images"):
        pipe(img, "x", num_images=0)
    for g in (float("inf"), float("nan"), -0.5, "7"):
        with pytest.raises(Sd3trtError, match="guidance_scale must be a finite number"):
            pipe(img, "x", guidance_scale=g)
    with pytest.raises(Sd3trtError):
        pipe(Image.new("RGB", (8, 8)), "x")  # smaller than one 16 px cell
    with pytest.raises(Sd3trtError, match="512"):
        pipe(Image.new("RGB", (64, 1024)), "x")  # past the tiny model's positional embedding
    with pytest.raises(Sd3trtError, match="backend"):
        Img2Img.from_bundle(bundle, backend="cuda-magic")


def test_cli_fails_before_it_works(tiny_sd3, tmp_path, input_png):
    """Every output path and option is checked before any engine runs: no 'denoising' line, nothing written."""
    _, bundle = tiny_sd3
    base = ["img2img", "--bundle", bundle, "--image", input_png, "--prompt", "x", "--steps", 2]
    existing = tmp_path / "have.png"
    existing.write_bytes(b"keep me")
    (tmp_path / "many-1.png").write_bytes(b"keep me too")
    cases = [
        (["--out", tmp_path / "nonexistent" / "o.png"], "output directory"),
        (["--out", tmp_path], "extension"),
        (["--out", existing], "exists; pass --overwrite"),
        (["--num-images", 2, "--out", tmp_path / "many.png"], "many-1.png' exists"),
        (["--guidance", "inf", "--out", tmp_path / "g.png"], "guidance_scale must be a finite number >= 0"),
        (["--guidance", "nan", "--out", tmp_path / "g.png"], "guidance_scale must be a finite number >= 0"),
        (["--guidance", "-1", "--out", tmp_path / "g.png"], "guidance_scale must be a finite number >= 0"),
    ]
    for args, message in cases:
        r = sd3trt(*base, *args)
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr)
        assert "denoising" not in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    assert existing.read_bytes() == b"keep me" and (tmp_path / "many-1.png").read_bytes() == b"keep me too"
    assert not (tmp_path / "many-0.png").exists() and not (tmp_path / "g.png").exists()
    r = sd3trt(*base, "--out", existing, "--overwrite")
    assert r.returncode == 0, r.stderr
    with Image.open(existing) as im:
        assert im.format == "PNG"
    # The demo checks its --out before it makes a model.
    r = sd3trt("demo", "--workdir", tmp_path / "demo", "--out", tmp_path / "nonexistent" / "d.png")
    assert r.returncode == 2 and "output directory" in r.stderr
    assert not (tmp_path / "demo" / "tiny-model").exists()


def test_cli_precision_with_tensorrt_is_never_ignored(tiny_sd3, tmp_path, input_png):
    _, bundle = tiny_sd3  # no engine builds: a TensorRT precision is refused naming the build that makes it
    base = ["img2img", "--bundle", bundle, "--image", input_png, "--prompt", "x", "--backend", "tensorrt"]
    for args, message in [
        (["--precision", "int8"], f"`sd3trt build --bundle {bundle} --precision int8`"),
        (["--vae-precision", "int8"], "int8 VAE is a CPU graph, not for the tensorrt backend; use --backend onnxruntime or openvino"),
    ]:
        r = sd3trt(*base, *args, "--out", tmp_path / "o.png")
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    r = sd3trt("img2img", "--bundle", bundle, "--image", input_png, "--prompt", "x", "--precision", "bf16",
               "--out", tmp_path / "o.png")
    assert r.returncode == 2 and "bf16 is a TensorRT engine precision" in r.stderr, r.stderr
    assert not (tmp_path / "o.png").exists()


def test_truncation_is_one_short_line(tiny_sd3, tmp_path, input_png):
    _, bundle = tiny_sd3
    prompt = " ".join(f"word{i}" for i in range(800))  # ~7,000 characters
    r = sd3trt("img2img", "--bundle", bundle, "--image", input_png, "--prompt", prompt, "--negative-prompt", prompt,
               "--steps", 2, "--out", tmp_path / "o.png")
    assert r.returncode == 0, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.startswith("warning:")]
    assert len(lines) == 2 and all(len(l) < 120 for l in lines), lines
    assert lines[0].startswith("warning: prompt truncated: clip_l dropped ") and "t5 dropped" in lines[0]
    assert lines[1].startswith("warning: negative prompt truncated: ")
    assert "word799" not in r.stderr


def test_close_releases_every_loaded_runner(tiny_sd3, input_png):
    _, bundle = tiny_sd3
    closed = []
    with Img2Img.from_bundle(bundle) as pipe:
        pipe(input_png, "a cat", steps=2)
        loaded = pipe.loaded_components
        for name in loaded:
            pipe.runner(name).close = lambda name=name: closed.append(name)
    assert sorted(closed) == sorted(loaded) and len(loaded) >= 5 and pipe.loaded_components == ()
    pipe.close()  # idempotent
    assert len(closed) == len(loaded)


def test_cli_shows_library_warnings_only_while_it_runs(capsys):
    import logging

    from sd3trt.runtime.cli import warnings_on_stderr

    log = logging.getLogger("sd3trt.runtime.caches")
    with warnings_on_stderr():
        log.warning("cannot save the runtime cache")
        log.info("not shown")
    log.warning("after the command")
    err = capsys.readouterr().err
    assert err == "warning: cannot save the runtime cache\n", err

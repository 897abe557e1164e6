"""Image I/O for the runtime: decode any input to RGB, diffusers-exact pre/postprocessing, safe output files.

numpy and Pillow only (no torch, no diffusers).  The numerics of :func:`preprocess` and :func:`postprocess`
reproduce diffusers' ``VaeImageProcessor(vae_scale_factor=8, vae_latent_channels=16)`` bit for bit, which is
what ``StableDiffusion3Img2ImgPipeline`` uses.

Behaviour a caller must know:

* Transparency (RGBA, LA, PA, palette or colour-key ``transparency``) is composited over opaque white; the
  colour hidden under fully transparent pixels is discarded.
* EXIF orientation is applied, so the returned image is upright as a viewer shows it.
* 16-bit grayscale (``I;16*``) is scaled to 8 bits (``round(v / 257)``), never clipped.  ``I`` (32-bit int,
  e.g. 16-bit PGM) is read as 16-bit data when all values lie in 0..65535, otherwise stretched min..max.
  ``F`` (float) is read as 0..1 when all values lie there, as 0..255 when they lie there, otherwise
  stretched min..max; NaN and inf become 0.
* CMYK and other colour modes use Pillow's plain conversion to RGB (embedded ICC profiles are not applied).
* Animated / multi-frame inputs use their first frame.
* Every user-fixable problem raises :class:`sd3trt.errors.Sd3trtError` with a one-sentence message; Pillow's
  traceback is not chained onto it.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from pathlib import Path
from typing import BinaryIO, Sequence, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError, features

from sd3trt.errors import Sd3trtError
from sd3trt.files import write_bytes_atomic
from sd3trt.spec import SD3_PIXEL_MULTIPLE, SD3_VAE_SCALE_FACTOR

#: Decompression-bomb guard: the most pixels (width * height, read from the file header before any pixel
#: data is decoded) that :func:`load_image` accepts.  4096 * 4096 = 16,777,216 (16.8 MP): enough for any
#: input SD3 can use (the engines' side limits are far smaller), small enough that a decoded RGBA copy stays
#: under ~70 MB.  ``None`` disables this check (Pillow's own ``Image.MAX_IMAGE_PIXELS`` still applies).
DEFAULT_MAX_PIXELS = 4096 * 4096

#: target_size's default: ModelFacts.pixel_multiple of the released SD3 / SD3.5 models.
DEFAULT_MULTIPLE = SD3_PIXEL_MULTIPLE

#: preprocess's default, as diffusers' VaeImageProcessor's: the released models' vae_scale_factor.
VAE_SCALE_FACTOR = SD3_VAE_SCALE_FACTOR

#: Output formats, canonical names (lower case).  "jpg" is accepted as an alias of "jpeg".
OUTPUT_FORMATS = ("png", "jpeg", "webp")
FORMAT_ALIASES = {"png": "png", "jpeg": "jpeg", "jpg": "jpeg", "webp": "webp"}
#: File extensions (lower case) -> canonical format.
EXTENSIONS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
#: Quality used when ``quality`` is None (PNG is lossless and ignores it).
DEFAULT_QUALITY = {"jpeg": 95, "webp": 90}

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO, Image.Image]

_PIL_FORMAT = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
_HIGH_DEPTH_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


# --------------------------------------------------------------------------------------------- input


def load_image(source: ImageSource, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode ``source`` (a path, encoded bytes, a binary file object or a PIL image) to a new RGB image.

    The pixel count is checked against ``max_pixels`` from the header before any pixel data is decoded.
    Transparency is composited over white, EXIF orientation applied, high bit depths scaled to 8 bits
    (see the module docstring).  A ``str`` is always a path; encoded data must be ``bytes``.
    The caller's PIL image is never modified.
    """
    check_max_pixels(max_pixels)
    if isinstance(source, Image.Image):
        name = "the input image"
        _check_size(source.size, max_pixels, name)
        _decode(source, name, max_pixels)
        return _finish(source, name)

    fp, name, close = _open_source(source)
    try:  # im.close() is not called: it would close a caller's stream too; we close the files we opened
        im = _identify(fp, name, max_pixels)
        _check_size(im.size, max_pixels, name)
        _decode(im, name, max_pixels)
        return _finish(im, name)
    finally:
        if close:
            fp.close()


def check_max_pixels(max_pixels: int | None) -> None:
    if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, int)
                                   or max_pixels < 1):
        raise Sd3trtError(f"max_pixels must be a positive integer or None, got {max_pixels!r}")


def check_pixel_count(size: tuple[int, int], max_pixels: int | None, name: str) -> None:
    """An image of `size` (w, h) that is empty or over `max_pixels` -> Sd3trtError naming it."""
    check_max_pixels(max_pixels)
    _check_size(size, max_pixels, name)


def _open_source(source) -> tuple[BinaryIO, str, bool]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise Sd3trtError("the input image data is empty; pass the bytes of a PNG, JPEG, WEBP or other image file")
        return io.BytesIO(data), "the input image data", False
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        name = f"input image {str(path)!r}"
        try:
            fp = open(path, "rb")
        except FileNotFoundError:
            raise Sd3trtError(f"{name} does not exist; check the path") from None
        except IsADirectoryError:
            raise Sd3trtError(f"{name} is a directory; pass the path of an image file") from None
        except PermissionError:
            raise Sd3trtError(f"{name} cannot be opened (permission denied); make it readable") from None
        except OSError as e:
            raise Sd3trtError(f"{name} cannot be opened ({_reason(e)}); check the path") from None
        return fp, name, True
    if hasattr(source, "read"):
        return source, "the input image stream", False
    raise Sd3trtError(f"unsupported image source of type {type(source).__name__}; pass a file path, the image "
                      "file's bytes, a PIL image, or pixels (uint8 [H, W, 3] or float [3, H, W] in [0, 1])")


def _identify(fp: BinaryIO, name: str, max_pixels: int | None) -> Image.Image:
    """Image.open: reads the header only.  Pillow's own bomb guard is mapped to our message."""
    with warnings.catch_warnings():
        # Pillow warns between MAX_IMAGE_PIXELS and 2x that; our max_pixels check (right after) decides.
        # (No record=True: that would swap the process-wide showwarning, unsafe under threads.)
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return Image.open(fp)
        except Image.DecompressionBombError as e:
            raise _too_large(name, None, max_pixels, e) from None
        except UnidentifiedImageError:
            raise Sd3trtError(f"{name} is not a readable image (unknown format or corrupt header); "
                              "pass a PNG, JPEG, WEBP or other common image file") from None
        except Exception as e:  # noqa: BLE001 - untrusted data can make any decoder raise anything
            raise Sd3trtError(f"{name} cannot be read ({_reason(e)}); re-save or re-download the file") from None


def _check_size(size: tuple[int, int], max_pixels: int | None, name: str) -> None:
    w, h = size
    if w < 1 or h < 1:
        raise Sd3trtError(f"{name} has zero size ({w}x{h}); pass an image with pixels in it")
    if max_pixels is not None and w * h > max_pixels:
        raise _too_large(name, (w, h), max_pixels)


def _too_large(name: str, size: tuple[int, int] | None, max_pixels: int | None,
               pil_error: BaseException | None = None) -> Sd3trtError:
    pil_limit = None if Image.MAX_IMAGE_PIXELS is None else 2 * int(Image.MAX_IMAGE_PIXELS)
    limits = [x for x in (max_pixels, pil_limit) if x is not None]
    limit = min(limits) if limits else 0
    knob = "max_pixels" if max_pixels is not None and limit == max_pixels else "PIL.Image.MAX_IMAGE_PIXELS"
    if size is not None:
        what = f"is {size[0]}x{size[1]} = {size[0] * size[1]:,} pixels"
    else:  # Pillow's guard fired inside Image.open: its message carries the pixel count
        m = re.search(r"\((\d+) pixels\)", str(pil_error or ""))
        what = f"has {int(m.group(1)):,} pixels" if m else "has too many pixels"
    return Sd3trtError(f"{name} {what}, over the decompression-bomb limit of {limit:,} pixels; "
                       f"downscale it or raise the limit ({knob})")


def _decode(im: Image.Image, name: str, max_pixels: int | None) -> None:
    """Decode the pixel data (frame 0), mapping truncation / corruption to Sd3trtError."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im.load()
        except Image.DecompressionBombError as e:
            raise _too_large(name, None, max_pixels, e) from None
        except Exception as e:  # noqa: BLE001 - see _identify
            raise Sd3trtError(f"{name} is truncated or corrupt ({_reason(e)}); re-save or re-download the file") from None


def _finish(im: Image.Image, name: str) -> Image.Image:
    try:
        upright = ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001 - malformed EXIF: the pixels decoded fine, keep them as stored
        upright = im.copy()
    try:
        out = to_rgb(upright)
    except (ValueError, OSError) as e:
        raise Sd3trtError(f"{name} has colour mode {upright.mode!r} that cannot be converted to RGB ({_reason(e)}); "
                          "convert it to RGB first") from None
    return out  # never the caller's object: exif_transpose always returns a new image


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as mode RGB: alpha composited over white, high bit depths scaled (not clipped) to 8 bits.

    Returns ``image`` itself when it is already RGB without a transparency key.
    """
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode in _HIGH_DEPTH_MODES:
        arr = np.asarray(image)
        gray = Image.fromarray(_to_uint8(arr, mode))
        key = image.info.get("transparency")
        if isinstance(key, (int, float)) and not isinstance(key, bool):
            alpha = Image.fromarray(np.where(arr == key, 0, 255).astype(np.uint8))
            return _over_white(Image.merge("RGBA", (gray, gray, gray, alpha)))
        return gray.convert("RGB")
    if mode == "La":  # premultiplied: Pillow converts it to LA but not to RGB(A) directly
        image, mode = image.convert("LA"), "LA"
    if mode in _ALPHA_MODES or "transparency" in image.info:
        return _over_white(image.convert("RGBA"))
    return image.convert("RGB")


def _over_white(rgba: Image.Image) -> Image.Image:
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    a = arr.astype(np.float64)
    if mode.startswith("I;16"):
        v = a / 257.0
    else:
        finite = np.isfinite(a)
        a = np.where(finite, a, 0.0)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if mode == "I" and lo >= 0 and hi <= 65535:
            v = a / 257.0
        elif mode == "F" and lo >= 0 and hi <= 1.0:
            v = a * 255.0
        elif mode == "F" and lo >= 0 and hi <= 255.0:
            v = a
        elif hi > lo:
            v = (a - lo) * (255.0 / (hi - lo))
        else:
            v = np.zeros_like(a)
    return np.clip(np.rint(v), 0, 255).astype(np.uint8)


def target_size(width: int, height: int, multiple: int = DEFAULT_MULTIPLE,
                max_side: int | None = None) -> tuple[int, int]:
    """(w, h) floored to ``multiple`` (SD3: 16); too small or (when given) over ``max_side`` -> Sd3trtError."""
    if multiple < 1:
        raise ValueError(f"multiple must be positive, got {multiple}")
    if width < multiple or height < multiple:
        raise Sd3trtError(f"the input image is {width}x{height} pixels, smaller than {multiple} px on a side; "
                          f"use an image at least {multiple}x{multiple}")
    w, h = width - width % multiple, height - height % multiple
    if max_side is not None and max(w, h) > max_side:
        raise Sd3trtError(f"the input image is {width}x{height} pixels, over the {max_side}-pixel side limit; "
                          f"downscale it to at most {max_side} px per side")
    return w, h


def preprocess(image: Image.Image | Sequence[Image.Image], width: int | None = None,
               height: int | None = None, vae_scale_factor: int = VAE_SCALE_FACTOR) -> np.ndarray:
    """PIL image(s) -> float32 [B, 3, H, W] in [-1, 1], as
    ``VaeImageProcessor(vae_scale_factor=vae_scale_factor).preprocess(image, height, width)``.

    Like diffusers, ``width``/``height`` default to the first image's size and are floored to a multiple of
    ``vae_scale_factor`` (the model's: ModelFacts.vae_scale_factor);
    each image is resized with Pillow's Lanczos filter (a no-op copy when the size already matches).
    Non-RGB images are first converted with :func:`to_rgb` (diffusers would pass the extra channels on).
    """
    images = list(image) if isinstance(image, (list, tuple)) else [image]
    if not images:
        raise ValueError("preprocess needs at least one image")
    for im in images:
        if not isinstance(im, Image.Image):
            raise TypeError(f"preprocess takes PIL images, got {type(im).__name__}")
    width = images[0].width if width is None else int(width)
    height = images[0].height if height is None else int(height)
    width, height = width - width % vae_scale_factor, height - height % vae_scale_factor
    if width < 1 or height < 1:
        raise Sd3trtError(f"the target size must be at least {vae_scale_factor}x{vae_scale_factor} pixels; "
                          "use a larger width and height")
    out = np.empty((len(images), 3, height, width), dtype=np.float32)
    for i, im in enumerate(images):
        im = to_rgb(im)
        im = im.resize((width, height), resample=Image.Resampling.LANCZOS, reducing_gap=None)
        x = np.asarray(im).astype(np.float32) / 255.0  # diffusers pil_to_numpy
        out[i] = (2.0 * x - 1.0).transpose(2, 0, 1)  # normalize; HWC -> CHW
    return out


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Decoded images [B, 3, H, W] (or [3, H, W]; float16/32/64) in [-1, 1] -> uint8 [B, H, W, C].

    Bit-exact with ``VaeImageProcessor.postprocess(torch_tensor, output_type="pil")``'s pixels: ``x * 0.5 + 0.5``
    clamped to [0, 1] in the input dtype, then float32, ``(v * 255).round()`` to uint8.  NaN becomes 0.
    """
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"postprocess expects [B, 3, H, W], got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"postprocess expects a float array, got {x.dtype}")
    v = np.clip(x * 0.5 + 0.5, 0, 1)  # diffusers denormalize, in the input dtype
    v = v.astype(np.float32).transpose(0, 2, 3, 1)  # pt_to_numpy: .float(), NCHW -> NHWC
    if np.isnan(v).any():
        v = np.nan_to_num(v, nan=0.0)
    return (v * 255).round().astype(np.uint8)  # numpy_to_pil


def postprocess(x: np.ndarray) -> list[Image.Image]:
    """Decoded images [B, 3, H, W] in [-1, 1] -> RGB PIL images (:func:`to_uint8`); one channel gives mode L."""
    return to_pil(to_uint8(x))


def to_pil(u8: np.ndarray) -> list[Image.Image]:
    """uint8 [B, H, W, C] -> PIL images (C 1: mode L, 3: RGB)."""
    return [Image.fromarray(np.ascontiguousarray(a[..., 0] if a.shape[-1] == 1 else a)) for a in u8]


# -------------------------------------------------------------------------------------------- output


def normalize_format(fmt: str) -> str:
    """'PNG' / 'jpg' / 'JPEG' / 'webp' ... -> the canonical name in OUTPUT_FORMATS."""
    key = str(fmt).strip().lower().lstrip(".")
    if key not in FORMAT_ALIASES:
        raise Sd3trtError(f"unknown output format {fmt!r}; use one of: {', '.join(OUTPUT_FORMATS)} (or jpg)")
    return FORMAT_ALIASES[key]


def format_from_path(path: str | os.PathLike) -> str:
    """The canonical output format for ``path``'s extension (case-insensitive)."""
    suffix = Path(path).suffix.lower()
    if suffix not in EXTENSIONS:
        what = f"extension {suffix!r}" if suffix else "no extension"
        raise Sd3trtError(f"output file {str(path)!r} has {what}; name it with one of: {', '.join(EXTENSIONS)}")
    return EXTENSIONS[suffix]


def encode_image(image: Image.Image, fmt: str, quality: int | None = None) -> bytes:
    """Encode to PNG (lossless, ``quality`` ignored), JPEG (default 95) or WEBP (default 90)."""
    fmt = normalize_format(fmt)
    if quality is not None and (isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100):
        raise Sd3trtError(f"quality must be an integer in 1..100, got {quality!r}")
    if fmt == "webp" and not features.check("webp"):
        raise Sd3trtError("this Pillow build has no WEBP support; choose png or jpeg")
    if fmt == "jpeg" and image.mode not in ("RGB", "L"):
        image = to_rgb(image)
    opts: dict = {}
    if fmt != "png":
        opts["quality"] = DEFAULT_QUALITY[fmt] if quality is None else quality
    buf = io.BytesIO()
    try:
        image.save(buf, _PIL_FORMAT[fmt], **opts)
    except (OSError, ValueError) as e:
        raise Sd3trtError(f"cannot encode the {image.width}x{image.height} {image.mode} image as {fmt} "
                          f"({_reason(e)}); choose another format") from None
    return buf.getvalue()


def save_image(image: Image.Image, path: str | os.PathLike, fmt: str | None = None,
               quality: int | None = None) -> Path:
    """Write ``image`` to ``path`` atomically; the format comes from the extension when ``fmt`` is None.

    The image is encoded in memory first, then written to a temporary file in the same directory, fsynced
    and renamed over ``path`` (os.replace): a failure never leaves a partial or empty file and never
    clobbers an existing one.  An explicit ``fmt`` wins over the extension.  The directory must exist.
    """
    path = Path(path)
    fmt = format_from_path(path) if fmt is None else normalize_format(fmt)
    data = encode_image(image, fmt, quality)
    write_atomic(path, data)
    return path


def check_output(path: str | os.PathLike, overwrite: bool = True) -> None:
    """Refuse, before any work, an output image that could not be written: unknown extension, missing or
    read-only directory, a directory in its place, or (overwrite False) an existing file."""
    format_from_path(path)
    _check_destination(Path(path))
    if not overwrite and Path(path).exists():
        raise Sd3trtError(f"output file {str(path)!r} exists; pass --overwrite to replace it or choose another --out")


def _check_destination(path: Path) -> Path:
    """The directory `path` will be written into, when it can be; else one sentence naming the problem."""
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise Sd3trtError(f"output directory {str(parent)!r} does not exist; create it first")
    if path.is_dir():
        raise Sd3trtError(f"output path {str(path)!r} is a directory; give a file name")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise Sd3trtError(f"output directory {str(parent)!r} is not writable; choose another directory")
    return parent


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Replace ``path`` with ``data`` all at once (sd3trt.files.write_bytes_atomic); errors -> Sd3trtError."""
    path = Path(path)
    _check_destination(path)
    try:
        write_bytes_atomic(path, data)
    except OSError as e:
        raise Sd3trtError(f"cannot write {str(path)!r} ({_reason(e)}); check the directory's permissions and free space") from None


def _reason(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, OSError) and e.strerror:
        text = e.strerror
    return text[:200]

"""Turning the request's ``image`` field into a decoded, size-checked PIL image, safely.

The field is either base64 of the file bytes (a ``data:image/...;base64,`` prefix and whitespace
are tolerated) or an http(s) URL (fetched by ``fetch.fetch`` under its SSRF rules). It is never
treated as a path. The bytes must be one of the allowed formats; the pixel count is checked from
the header before anything is decoded (decompression bombs), and the decoded bytes are capped.
"""

from __future__ import annotations

import base64 as b64
import binascii
import io
import re
import warnings

from PIL import Image, UnidentifiedImageError

from sd3trt.errors import Sd3trtError
from sd3trt.runtime import images as imgs

# Input formats the server decodes (Pillow format names). Everything else is refused.
DEFAULT_INPUT_FORMATS = ("PNG", "JPEG", "WEBP")

_DATA_URI = re.compile(r"^data:[\w.+-]+/[\w.+-]+(;[\w=.+-]+)*;base64,", re.IGNORECASE)
_WS = re.compile(r"\s+")


class InputError(Exception):
    """A bad ``image`` field: ``status`` 400 (unusable) or 413 (too large)."""

    def __init__(self, message: str, status: int = 400, code: str = "bad_image"):
        super().__init__(message)
        self.status = status
        self.code = code


def is_image_url(value: str) -> bool:
    head = value[:16].lower()
    return "://" in value[:32] or head.startswith(("http:", "https:"))


def decode_base64(value: str, max_bytes: int) -> bytes:
    m = _DATA_URI.match(value[:200])
    s = _WS.sub("", value[m.end():] if m else value)
    if not s:
        raise InputError("image is empty; send base64 of a PNG, JPEG or WEBP file, or an http(s) URL",
                         code="bad_base64")
    if len(s) * 3 // 4 > max_bytes + 3:
        raise InputError(f"the image is larger than {max_bytes} bytes", status=413, code="image_too_large")
    alt = b"-_" if ("-" in s or "_" in s) else None
    s += "=" * (-len(s) % 4)
    try:
        data = b64.b64decode(s, altchars=alt, validate=True)
    except (binascii.Error, ValueError):
        raise InputError("image is neither valid base64 nor an http(s) URL", code="bad_base64") from None
    if len(data) > max_bytes:
        raise InputError(f"the image is larger than {max_bytes} bytes", status=413, code="image_too_large")
    return data


def open_image(data: bytes, max_pixels: int, formats: tuple[str, ...] = DEFAULT_INPUT_FORMATS) -> Image.Image:
    """``data`` decoded to RGB if it is an allowed format within ``max_pixels``; raises InputError otherwise.

    Only the allowed formats' parsers ever see the bytes; the pixel count is checked from the header;
    decoding, EXIF orientation and the RGB conversion are the runtime's ``load_image``.
    """
    allowed = ", ".join(formats)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the max_pixels check decides
        try:
            im = Image.open(io.BytesIO(data), formats=list(formats))  # the header only
        except Image.DecompressionBombError:
            raise InputError(f"the image has more than {max_pixels} pixels", status=413,
                             code="image_too_large") from None
        except UnidentifiedImageError:
            other = _sniff(data)
            if other in formats:
                raise InputError(f"the {other} image is corrupt; send a valid {allowed} file", code="bad_image") from None
            if other:
                raise InputError(f"{other} images are not accepted; send {allowed}", code="unsupported_image") from None
            raise InputError(f"the image bytes are not an image; send {allowed}", code="not_an_image") from None
        except Exception:  # noqa: BLE001 - untrusted bytes can make a parser raise anything
            raise InputError(f"the image header cannot be read; send a valid {allowed} file", code="bad_image") from None
    w, h = im.size
    if w * h > max_pixels:
        raise InputError(f"the image is {w}x{h} = {w * h} pixels; the limit is {max_pixels}", status=413,
                         code="image_too_large")
    try:
        return imgs.load_image(im, max_pixels=max_pixels)
    except Sd3trtError as e:
        raise InputError(str(e), code="bad_image") from None


_MAGIC = ((b"GIF87a", "GIF"), (b"GIF89a", "GIF"), (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
          (b"\x00\x00\x01\x00", "ICO"), (b"%!PS", "PostScript"), (b"%PDF", "PDF"), (b"<svg", "SVG"),
          (b"<?xml", "SVG/XML"), (b"\x89PNG", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"8BPS", "PSD"),
          (b"qoif", "QOI"), (b"\x00\x00\x00\x0cjP", "JPEG 2000"))


def _sniff(data: bytes) -> str | None:
    """The format of an image the server refuses, from its magic bytes (no parser runs on it)."""
    head = data[:16]
    if head[4:12] in (b"ftypavif", b"ftypheic", b"ftypmif1", b"ftypheix"):
        return "AVIF/HEIF"
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    return None

"""Images as arrays, for hosts that hold pixels rather than files: what the pipeline accepts and how.

Accepted (one image, no batch axis):

  uint8  [H, W, 3]  RGB, 0..255        ([H, W] gray and [H, W, 4] RGBA too: converted like a PIL image)
  float  [3, H, W]  RGB in [0, 1]      (float16/32/64; values outside [0, 1] are refused, not clipped)

as a numpy array, any object with ``__dlpack__`` (torch, cupy, jax ...; CPU tensors are read zero-copy,
CUDA tensors are copied to the host on the caller's stream: runtime/dlpack.py), or any object exposing
a 3-dimensional buffer (the buffer protocol). bytes, bytearray and 1-D buffers stay encoded image files.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from sd3trt.errors import Sd3trtError
from sd3trt.runtime import dlpack

FLOATS = (np.float16, np.float32, np.float64)


def as_pixel_array(source, stream=None) -> np.ndarray | None:
    """`source` as a numpy array when it is pixels (see the module docstring); None when it is a file,
    encoded bytes or a PIL image. Checks the layout and value range."""
    if isinstance(source, (str, bytes, bytearray, Image.Image)) or hasattr(source, "read"):
        return None
    if isinstance(source, np.ndarray):
        arr = source
    elif hasattr(source, "__dlpack__"):
        kind = dlpack.device_type(source)
        if kind in (dlpack.CPU, dlpack.CUDA_HOST):
            arr = np.from_dlpack(source)
        elif kind == dlpack.CUDA:
            arr = dlpack.to_host(source, stream)  # GPU path
        else:
            raise Sd3trtError(f"image tensors on DLPack device type {kind} are not supported; pass a CPU or CUDA tensor")
    else:
        try:
            view = memoryview(source)
        except TypeError:
            return None
        if view.ndim != 3:
            return None if view.ndim <= 1 else _layout_error(view.shape, view.format)
        arr = np.asarray(view)
    return check_pixels(arr)


def _layout_error(shape, dtype) -> None:
    raise Sd3trtError(f"an image array must be uint8 [H, W, 3] or float [3, H, W] in [0, 1]; got {dtype} "
                      f"{list(shape)}")


def check_pixels(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8 and (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        return arr
    if arr.dtype in FLOATS and arr.ndim == 3 and arr.shape[0] == 3:
        if arr.size and not (np.isfinite(arr).all() and arr.min() >= 0.0 and arr.max() <= 1.0):
            raise Sd3trtError(f"a float image must hold values in [0, 1], got min {arr.min()} max {arr.max()}; "
                              "scale it (x / 255, or x / 2 + 0.5 from [-1, 1]) or pass uint8")
        return arr
    _layout_error(arr.shape, arr.dtype)


def size_of(arr: np.ndarray) -> tuple[int, int]:
    """(width, height) of a checked pixel array."""
    return (arr.shape[2], arr.shape[1]) if arr.dtype in FLOATS else (arr.shape[1], arr.shape[0])


def to_pil(arr: np.ndarray) -> Image.Image:
    """A uint8 array as a PIL image (gray, RGB or RGBA by its channels)."""
    return Image.fromarray(np.ascontiguousarray(arr))


def preprocess_float(arr: np.ndarray, width: int, height: int) -> np.ndarray:
    """float [3, H, W] in [0, 1] -> float32 [1, 3, height, width] in [-1, 1]; resized (Lanczos, per channel)
    only when the size differs."""
    x = np.asarray(arr, dtype=np.float32)
    if x.shape[1:] != (height, width):
        x = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(c)).resize(
            (width, height), Image.Resampling.LANCZOS, reducing_gap=None)) for c in x])
    return (2.0 * x - 1.0)[None]


def write_out(out, results: tuple[np.ndarray, ...], stream=None) -> None:
    """Copy into `out` whichever of `results` has its dtype and shape: a numpy array, a writable buffer or a
    CPU DLPack tensor (numpy copies in place), or a CUDA tensor (copied on the caller's `stream`)."""
    if hasattr(out, "__dlpack__") and not isinstance(out, np.ndarray) and dlpack.device_type(out) == dlpack.CUDA:
        dlpack.copy_into(out, results, stream)  # GPU path
        return
    try:
        view = np.from_dlpack(out) if hasattr(out, "__dlpack__") else np.asarray(memoryview(out))
    except (TypeError, BufferError, RuntimeError) as e:
        raise Sd3trtError(f"out must be an array, a writable buffer or a DLPack tensor ({e})") from None
    for r in results:
        if view.dtype == r.dtype and view.shape == r.shape:
            if not view.flags.writeable:
                raise Sd3trtError("out is read-only; pass a writable array")
            np.copyto(view, r)
            return
    raise Sd3trtError(dlpack.mismatch(view.dtype, view.shape, results))

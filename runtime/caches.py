"""Where runtime caches live, and the TensorRT-RTX runtime cache file.

Caches go beside the engines when the bundle is writable, else under $SD3TRT_CACHE_DIR (default
~/.cache/sd3trt). They only save start-up time: a cache that cannot be read or written is logged
(logging.warning), never fatal.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from sd3trt.errors import Sd3trtError
from sd3trt.files import write_bytes_atomic

ENV_CACHE = "SD3TRT_CACHE_DIR"  # where runtime caches go when the bundle is read-only
log = logging.getLogger(__name__)


def cache_base() -> Path:
    return Path(os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "sd3trt")


def bundle_key(root: Path) -> str:
    """A short name for a bundle's caches under cache_base(), distinct per bundle location."""
    return hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:16]


def writable_dir(preferred: Path, fallback_name: str) -> Path:
    """`preferred`, created with its parents, when it is writable; else cache_base()/`fallback_name`."""
    try:
        preferred.mkdir(parents=True, exist_ok=True)
        if os.access(preferred, os.W_OK):
            return preferred
    except OSError:
        pass
    fallback = cache_base() / fallback_name
    try:
        fallback.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise Sd3trtError(
            f"neither {preferred} nor {fallback} can hold caches ({e.strerror}); set {ENV_CACHE} to a writable directory"
        ) from None
    return fallback


def runtime_cache_path(engine_path: Path, meta: dict) -> Path | None:
    """The RTX runtime cache of one engine: beside it when the bundle is writable, else under cache_base()."""
    if meta.get("flavour") != "tensorrt_rtx":
        return None
    name = f"{meta['component']}.runtime.cache"
    if os.access(engine_path.parent, os.W_OK):
        return engine_path.parent / name
    return cache_base() / f"{meta.get('engine_sha256', 'engine')[:16]}-{name}"


class RuntimeCacheFile:
    """A TensorRT-RTX runtime cache (the kernels it compiles at run time) and the file that keeps it.

    Loaded once when the first execution context is made. Saved after the first run at each new
    (profile, shapes) key, so a killed process keeps the work, and again on close (RTX may still
    specialize kernels after the first run). A file the runtime rejects - made on another GPU, driver
    or TensorRT-RTX, or damaged - is reported and replaced by the next save.
    """

    def __init__(self, cache, path: Path | None):
        self.cache, self.path = cache, path  # cache: the flavour's IRuntimeCache
        self.saved_keys: set = set()
        self._write_warned = False
        if path is not None and path.is_file():
            self._load()

    def _load(self) -> None:
        try:
            blob = self.path.read_bytes()
        except OSError as e:
            log.warning("cannot read the TensorRT-RTX runtime cache %s (%s); starting a new one", self.path, e.strerror)
            return
        if not self.cache.deserialize(blob):
            log.warning(
                "TensorRT-RTX rejected the runtime cache %s (made for another GPU, driver or TensorRT-RTX version, "
                "or damaged); starting a new one, which replaces it at the next save", self.path,
            )

    def ran(self, key) -> None:
        """Call after each run: saves when `key` (profile and input shapes) is new."""
        if key not in self.saved_keys:
            self.saved_keys.add(key)
            self.save()

    def save(self) -> None:
        if self.path is None:
            return
        try:
            write_bytes_atomic(self.path, bytes(memoryview(self.cache.serialize())))
        except OSError as e:
            if not self._write_warned:
                self._write_warned = True
                log.warning("cannot save the TensorRT-RTX runtime cache %s (%s); set %s to a writable directory",
                            self.path, e.strerror, ENV_CACHE)

"""Byte sizes written by people ("4GiB", "512MiB", "2G", "1e9"), for flags and environment variables.

Standard library only: the engine builder (--workspace) and the runtime (SD3TRT_WEIGHT_STREAMING_BUDGET)
both parse with it.
"""

from __future__ import annotations

import re

from sd3trt.errors import Sd3trtError


def parse_size(text: str | int | None, what: str = "--workspace") -> int | None:
    """"4GiB", "512MiB", "2G", "1e9" or plain bytes -> bytes; `what` names the flag or variable in errors."""
    if text is None or isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*(?:([KMGT])(?:i?B)?|B)?\s*", str(text))
    if not m:
        raise Sd3trtError(f"{what} {text!r} is not a size such as 4GiB or 512MiB; write it that way")
    return int(float(m.group(1)) * 1024 ** (" KMGT".index(m.group(2)) if m.group(2) else 0))

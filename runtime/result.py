"""What a run returns: the images as numpy arrays (PIL images on request), timings and warnings."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from sd3trt.runtime import images as imgs


@dataclass
class Result:
    """array:   uint8 [N, H, W, 3], the images (what PIL images and image files hold)
    decoded: float32 [N, 3, H, W] in [-1, 1], the VAE decoder's output before quantization (the
             engine's own array where it is float32 already: no copy)
    timings: seconds per stage (image_in is prepare's image decoding; total is the run's)
    warnings: one short line per problem the run worked around (prompt truncation)
    """

    array: np.ndarray = field(repr=False)
    decoded: np.ndarray = field(repr=False)
    timings: dict[str, float]
    warnings: list[str] = field(default_factory=list)
    seed: int | None = None

    @cached_property
    def images(self) -> list:
        """The images as PIL images (a convenience, made on first use)."""
        return imgs.to_pil(self.array)

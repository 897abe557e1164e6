"""A checked img2img request: Img2Img.prepare validates every parameter once and returns a Plan.

The Plan holds everything a run needs and nothing it must compute again: the preprocessed image, the
schedule, the noise, whether classifier-free guidance is on and (tensorrt) the engine build whose
profiles take the request. Its arrays are read-only, so one Plan may be run from several threads.
Refusals are RequestError (an Sd3trtError) with `field` naming the parameter at fault.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from sd3trt.errors import Sd3trtError
from sd3trt.runtime import arrays
from sd3trt.runtime import images as imgs
from sd3trt.runtime import scheduler as sch


class RequestError(Sd3trtError):
    """A request the pipeline refuses; `field` names the parameter (image, prompt, strength, noise, ...)."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


@contextmanager
def about(name: str) -> Iterator[None]:
    """Turn an Sd3trtError raised inside the block into a RequestError about parameter `name`."""
    try:
        yield
    except RequestError:
        raise
    except Sd3trtError as e:
        raise RequestError(str(e), name) from None


@dataclass(frozen=True, eq=False)
class Noise:
    """Caller-supplied randomness, so any result can be reproduced against another implementation.

    latents:   [num_images, C, h, w]  the noise that scale_noise mixes into the encoded image
    posterior: [1, C, h, w] or None   the VAE posterior sample's standard normal draw (None: from the seed)
    """

    latents: np.ndarray
    posterior: np.ndarray | None = None


@dataclass(frozen=True, eq=False)
class Plan:
    """One checked request (make it with Img2Img.prepare; run it with Img2Img.run, as often as wanted)."""

    pixels: np.ndarray = field(repr=False)  # [1, 3, height, width] float32 in [-1, 1]: the VAE encoder's input
    input_size: tuple[int, int]  # (width, height) of the image as decoded
    width: int  # the size the run works at: the input floored to the model's pixel multiple
    height: int
    prompt: str
    negative_prompt: str | None
    strength: float
    steps: int  # length of the full schedule; the run does len(timesteps) of them
    guidance_scale: float
    cfg: bool  # guidance_scale > 1: the transformer runs on [unconditional, conditional]
    num_images: int
    max_sequence_length: int
    timesteps: np.ndarray = field(repr=False)  # [k] float32, the transformer's timestep at each step run
    sigmas: np.ndarray = field(repr=False)  # [k + 1] float32, step i goes from sigmas[i] to sigmas[i + 1]
    noise: Noise = field(repr=False)  # latents [num_images, C, h, w], posterior [1, C, h, w] float32
    seed: int | None
    engine_build: str | None  # tensorrt: the build whose profiles were checked to take this request
    prepare_s: float = 0.0  # seconds prepare took (image decoding, mostly)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.noise.latents.shape)

    @property
    def steps_run(self) -> int:
        return len(self.timesteps)


def frozen(a: np.ndarray) -> np.ndarray:
    """`a` (an array this module made) marked read-only: a Plan is shared, never changed."""
    a.flags.writeable = False
    return a


def check_text(value, name: str, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise RequestError(f"{name} must be a string, got {type(value).__name__}", name)
    return value


def check_int(value, name: str, low: int, high: int | None = None) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) \
            or value < low or (high is not None and value > high):
        span = f"in {low}..{high}" if high is not None else f"at least {low}"
        raise RequestError(f"{name} must be an integer {span}, got {value!r}", name)
    return int(value)


def check_guidance(value) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(value) or value < 0:
        raise RequestError(f"guidance_scale must be a finite number >= 0 (<= 1 turns guidance off), got {value!r}",
                           "guidance_scale")
    return float(value)


def check_seed(seed) -> int | None:
    return None if seed is None else check_int(seed, "seed", 0)


def read_image(image, facts, max_pixels: int | None, stream=None) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
    """(pixels [1, 3, H, W] in [-1, 1], decoded (w, h), working (w, h)) from any accepted image source."""
    with about("image"):
        arr = arrays.as_pixel_array(image, stream)
        if arr is None:
            pil = imgs.load_image(image, max_pixels=max_pixels)
        else:
            imgs.check_pixel_count(arrays.size_of(arr), max_pixels, "the input image array")
            pil = None if arr.dtype in arrays.FLOATS else imgs.to_rgb(arrays.to_pil(arr))
        size = pil.size if pil is not None else arrays.size_of(arr)
        w, h = imgs.target_size(*size, multiple=facts.pixel_multiple, max_side=facts.max_image_side)
        pixels = (imgs.preprocess(pil, w, h, facts.vae_scale_factor) if pil is not None
                  else arrays.preprocess_float(arr, w, h))
    return pixels, size, (w, h)


def schedule(config: sch.SchedulerConfig, steps: int, strength: float, sigmas, mu, latent_hw: tuple[int, int],
             patch_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(timesteps, sigmas) of the part of the schedule img2img runs, and the full schedule's length.
    The scheduler holds the rules for steps, sigmas, mu and strength; they are applied here, once."""
    with about("mu"):
        if mu is None and config.use_dynamic_shifting:
            mu = sch.dynamic_mu(config, *latent_hw, patch_size)
    with about("sigmas" if sigmas is not None else "steps"):
        timesteps, sigma_all = sch.set_timesteps(config, None if sigmas is not None else steps, sigmas=sigmas, mu=mu)
    with about("strength"):
        run_t, run_s = sch.img2img_timesteps(timesteps, sigma_all, len(timesteps), strength)
    return run_t, run_s, len(timesteps)


def make_noise(noise: Noise | None, seed: int | None, latent_shape: tuple[int, ...]) -> Noise:
    """The caller's noise, checked against the request's shapes, or a draw from `seed`."""
    post_shape = (1,) + tuple(latent_shape[1:])
    if noise is None:
        rng = np.random.default_rng(seed)
        post = rng.standard_normal(post_shape, dtype=np.float32)
        return Noise(frozen(rng.standard_normal(latent_shape, dtype=np.float32)), frozen(post))
    if not isinstance(noise, Noise):
        raise RequestError(f"noise must be an sd3trt Noise, got {type(noise).__name__}", "noise")
    lat = np.array(noise.latents, dtype=np.float32)
    if lat.shape != tuple(latent_shape):
        raise RequestError(f"noise 'latents' has shape {lat.shape}, this request needs {tuple(latent_shape)} "
                           "(num_images, latent channels, height and width divided by the VAE factor)", "noise")
    if noise.posterior is None:
        post = np.random.default_rng(seed).standard_normal(post_shape, dtype=np.float32)
    else:
        post = np.array(noise.posterior, dtype=np.float32)
        if post.shape != post_shape:
            raise RequestError(f"noise 'posterior' has shape {post.shape}, this request needs {post_shape}", "noise")
    return Noise(frozen(lat), frozen(post))

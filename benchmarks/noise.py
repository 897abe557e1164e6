"""Identical randomness for every system: the workload's noise arrays, and their injection into diffusers.

The img2img latent noise [num_images, C, h, w] and the VAE posterior's standard-normal draw [1, C, h, w]
are drawn once per benchmark (numpy, seeded) and saved; sd3trt takes them as `Noise`, and diffusers
draws them through `randn_tensor`, patched here (the same way tests/diffusers_ref.py does).
"""

from __future__ import annotations

from contextlib import contextmanager
from unittest import mock

import numpy as np


def make_noise(num_images: int, channels: int, latent_h: int, latent_w: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "latents": rng.standard_normal((num_images, channels, latent_h, latent_w), dtype=np.float32),
        "posterior": rng.standard_normal((1, channels, latent_h, latent_w), dtype=np.float32),
    }


def picture(width: int, height: int, seed: int = 0):
    """A smooth gradient with some texture: a stand-in input photo (PIL, RGB)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / width, y / height, (x + y) / (width + height)], -1) * 200
    arr = (base + rng.normal(0, 20, base.shape)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


@contextmanager
def injected_noise(latents: np.ndarray, posterior: np.ndarray):
    """Make diffusers draw exactly these arrays: the img2img latent noise and the VAE posterior's normal draw."""
    import torch
    from diffusers.models.autoencoders import vae as vae_mod
    from diffusers.pipelines.stable_diffusion_3 import pipeline_stable_diffusion_3_img2img as p

    def fake(arr):
        def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
            if tuple(shape) != arr.shape:
                raise RuntimeError(f"diffusers asked for noise of shape {tuple(shape)}, the benchmark holds {arr.shape}")
            return torch.from_numpy(arr.copy()).to(device=device, dtype=dtype or torch.float32)

        return randn_tensor

    with mock.patch.object(p, "randn_tensor", fake(latents)), mock.patch.object(vae_mod, "randn_tensor", fake(posterior)):
        yield

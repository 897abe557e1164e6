"""The reference: diffusers' StableDiffusion3Img2ImgPipeline with caller-supplied noise injected."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import numpy as np
import torch


@contextmanager
def injected_noise(latents: np.ndarray, posterior: np.ndarray):
    """Make diffusers draw exactly our noise: the img2img latent noise and the VAE posterior's normal draw."""
    from diffusers.models.autoencoders import vae as vae_mod
    from diffusers.pipelines.stable_diffusion_3 import pipeline_stable_diffusion_3_img2img as p

    def fake(arr):
        def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
            assert tuple(shape) == arr.shape, (tuple(shape), arr.shape)
            return torch.from_numpy(arr.copy()).to(dtype or torch.float32)

        return randn_tensor

    with mock.patch.object(p, "randn_tensor", fake(latents)), mock.patch.object(vae_mod, "randn_tensor", fake(posterior)):
        yield


def run_reference(model_dir, image, prompt, negative_prompt=None, strength=0.6, steps=4, guidance_scale=7.0,
                  num_images=1, latents=None, posterior=None, max_sequence_length=256, loras=(), dtype=None):
    """Images as uint8 arrays [N, H, W, 3] from diffusers on the same weights and noise.
    loras: (path, scale) pairs, each loaded with load_lora_weights and fused with fuse_lora(lora_scale=scale).
    dtype: the pipeline's torch dtype (default float32)."""
    from diffusers import StableDiffusion3Img2ImgPipeline

    extra = {}
    if not (Path(model_dir) / "text_encoder_3").is_dir():  # the documented way to run SD3 without T5
        extra = dict(text_encoder_3=None, tokenizer_3=None)
    pipe = StableDiffusion3Img2ImgPipeline.from_pretrained(model_dir, dtype=dtype or torch.float32, **extra)
    pipe.set_progress_bar_config(disable=True)
    for path, scale in loras:  # one at a time: load, fuse at its scale, drop the (now fused) LoRA layers
        pipe.load_lora_weights(str(path))
        pipe.fuse_lora(lora_scale=scale)
        pipe.unload_lora_weights()
    with injected_noise(latents, posterior), torch.no_grad():
        out = pipe(
            prompt=prompt, negative_prompt=negative_prompt, image=image, strength=strength,
            num_inference_steps=steps, guidance_scale=guidance_scale, num_images_per_prompt=num_images,
            height=image.height, width=image.width, max_sequence_length=max_sequence_length, output_type="np",
        ).images
    out = out.astype(np.float32)
    return (out * 255).round().clip(0, 255).astype(np.uint8), out

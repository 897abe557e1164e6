"""SD3 img2img over a bundle: the same steps as diffusers' StableDiffusion3Img2ImgPipeline, in numpy.

    pipe = Img2Img.from_bundle("bundle/", backend="onnxruntime")
    result = pipe(image, "a cat", strength=0.6, steps=28, seed=1)
    result.images[0].save("out.png"); print(result.timings)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from sd3trt.errors import Sd3trtError
from sd3trt.manifest import Bundle, load_bundle
from sd3trt.runtime import images as imgs
from sd3trt.runtime import scheduler as sch
from sd3trt.runtime.prompts import PromptEncoder
from sd3trt.runtime.runners import BACKENDS, OrtRunner, Runner
from sd3trt.spec import T5_DEFAULT_LENGTH

DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 7.0
DEFAULT_STRENGTH = 0.6


@dataclass
class Noise:
    """Caller-supplied randomness, so any result can be reproduced against another implementation.

    latents:   [num_images, C, h, w]  the noise that scale_noise mixes into the encoded image
    posterior: [1, C, h, w] or None   the VAE posterior sample's standard normal draw
    """

    latents: np.ndarray
    posterior: np.ndarray | None = None


@dataclass
class Result:
    images: list  # PIL images
    timings: dict[str, float]  # seconds per stage
    warnings: list[str] = field(default_factory=list)
    seed: int | None = None
    decoded: np.ndarray | None = None  # VAE output before quantization, float32 [N, 3, H, W] in [-1, 1]


class Timer:
    def __init__(self):
        self.t: dict[str, float] = {}

    def add(self, key: str, since: float) -> None:
        self.t[key] = self.t.get(key, 0.0) + time.perf_counter() - since


class Img2Img:
    def __init__(self, bundle: Bundle, backend: str = "onnxruntime", low_memory: bool = False,
                 runner_factory: Callable[[str], Runner] | None = None, threads: int = 0,
                 engine_build: str | None = None, transformer_precision: str = "fp32", vae_precision: str = "fp32"):
        if backend not in BACKENDS:
            raise Sd3trtError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
        if bundle.dtype == "bf16" and backend.startswith("onnxruntime"):
            raise Sd3trtError("ONNX Runtime cannot run a bf16 bundle on CPU; export with --dtype fp32 or fp16")
        self.bundle = bundle
        self.facts = bundle.facts
        self.backend = backend
        self.low_memory = low_memory
        self.threads = threads
        self.engine_build = engine_build  # which `sd3trt build` output the tensorrt backend uses
        # int8 / fp8: quantized graphs made by `sd3trt quantize` (ONNX Runtime): the transformer, and the
        # VAE's int8 convolutions (CPU); TensorRT engines carry their precision in the build (engine_build).
        self.onnx_paths: dict[str, Path] = {}
        if vae_precision not in ("fp32", "int8"):
            raise Sd3trtError(f"unknown VAE precision {vae_precision!r}; use fp32 or int8")
        if vae_precision != "fp32" and backend != "onnxruntime":
            raise Sd3trtError(f"the int8 VAE is an ONNX Runtime CPU graph, not for the {backend} backend; use "
                              "--backend onnxruntime, or the fp16/bf16 VAE of a GPU engine build")
        if backend != "tensorrt" and (transformer_precision != "fp32" or vae_precision != "fp32"):
            if transformer_precision != "fp32":
                self.onnx_paths["transformer"] = bundle.quantized_path(transformer_precision)
            if vae_precision != "fp32":  # the VAE parts the bundle has in int8 (the encoder may have failed its gate)
                for name in bundle.quantized_parts(vae_precision, ("vae_decoder", "vae_encoder")):
                    self.onnx_paths[name] = bundle.quantized_path(vae_precision, name)
        self.float_dtype = np.dtype({"fp32": "float32", "fp16": "float16", "bf16": "float32"}[bundle.dtype])
        self._factory = runner_factory or self._default_factory
        self._runners: dict[str, Runner] = {}
        self.scheduler_config = sch.SchedulerConfig.from_dict(bundle.scheduler_config)
        dirs = {n: bundle.tokenizer_dir(n) for n in bundle.data["tokenizers"]}
        self.prompts = PromptEncoder(self.facts, dirs, self.runner)

    @classmethod
    def from_bundle(cls, path: str | Path, backend: str = "onnxruntime", **kw) -> "Img2Img":
        return cls(load_bundle(Path(path)), backend=backend, **kw)

    def _default_factory(self, name: str) -> Runner:
        entry = self.bundle.component(name)
        if self.backend == "tensorrt":
            from sd3trt.runtime.trt_runner import TrtRunner

            return TrtRunner.from_bundle(self.bundle, name, build=self.engine_build)
        providers = None
        if self.backend != "onnxruntime":
            from sd3trt.runtime.trt_runner import ort_gpu_providers

            providers = ort_gpu_providers("cuda" if self.backend == "onnxruntime-cuda" else "tensorrt", self.bundle)
        path = self.onnx_paths.get(name) or self.bundle.onnx_path(name)
        return OrtRunner(name, entry, path, providers=providers, threads=self.threads)

    def runner(self, name: str) -> Runner:
        if name not in self._runners:
            self._runners[name] = self._factory(name)
        return self._runners[name]

    def _release(self, *names: str) -> None:
        if self.low_memory:
            for n in names:
                r = self._runners.pop(n, None)
                if r is not None:
                    r.close()

    def close(self) -> None:
        """Release every loaded engine (a TensorRT runner saves its runtime cache first). Idempotent."""
        runners, self._runners = self._runners, {}
        for r in runners.values():
            r.close()

    def __enter__(self) -> "Img2Img":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def load_all(self) -> None:
        """Load every engine now (servers do this at start; the first request is then not slower)."""
        for name in self.bundle.data["components"]:
            self.runner(name)

    def __call__(
        self,
        image,
        prompt: str,
        negative_prompt: str | None = None,
        strength: float = DEFAULT_STRENGTH,
        steps: int = DEFAULT_STEPS,
        guidance_scale: float = DEFAULT_GUIDANCE,
        seed: int | None = None,
        num_images: int = 1,
        noise: Noise | None = None,
        max_sequence_length: int = T5_DEFAULT_LENGTH,
        sigmas: list[float] | None = None,
        mu: float | None = None,
        progress: Callable[[int, int], None] | None = None,
        max_pixels: int = imgs.DEFAULT_MAX_PIXELS,
    ) -> Result:
        timer = Timer()
        t_all = time.perf_counter()
        f = self.facts
        if not isinstance(prompt, str):
            raise Sd3trtError("prompt must be a string")
        if num_images < 1:
            raise Sd3trtError(f"num_images must be at least 1, got {num_images}")
        if not 1 <= max_sequence_length <= f.t5_max_length:
            raise Sd3trtError(f"max_sequence_length must be in 1..{f.t5_max_length}, got {max_sequence_length}")
        if not 0.0 <= strength <= 1.0:
            raise Sd3trtError(f"strength must be in [0, 1], got {strength}")
        if not (isinstance(guidance_scale, (int, float)) and math.isfinite(guidance_scale) and guidance_scale >= 0):
            raise Sd3trtError(f"guidance_scale must be a finite number >= 0 (<= 1 turns guidance off), got {guidance_scale}")
        if steps < 1 and sigmas is None:
            raise Sd3trtError(f"steps must be at least 1, got {steps}")

        t0 = time.perf_counter()
        pil = imgs.load_image(image, max_pixels=max_pixels)
        width, height = imgs.target_size(pil.width, pil.height, multiple=f.pixel_multiple, max_side=f.max_image_side)
        pixels = imgs.preprocess(pil, width, height)
        timer.add("image_in", t0)

        # Timesteps first: a strength that leaves no denoising step is refused before any engine runs.
        lh, lw = height // f.vae_scale_factor, width // f.vae_scale_factor
        if mu is None and self.scheduler_config.use_dynamic_shifting:
            mu = sch.dynamic_mu(self.scheduler_config, lh, lw, f.patch_size)
        timesteps, sigma_all = sch.set_timesteps(self.scheduler_config, None if sigmas else steps, sigmas=sigmas, mu=mu)
        timesteps, sigma_run = sch.img2img_timesteps(timesteps, sigma_all, len(timesteps), strength)

        cfg = guidance_scale > 1.0
        if self.backend == "tensorrt":  # refuse a request the engines' profiles cannot take, before any runs
            from sd3trt.runtime.trt_runner import check_request

            check_request(self.bundle, height, width, num_images, cfg, max_sequence_length, self.engine_build)
        latent_shape = (num_images, f.latent_channels, lh, lw)
        noise = self._noise(noise, seed, latent_shape)

        t0 = time.perf_counter()
        pos = self.prompts.encode(prompt, max_sequence_length)
        warnings = [w for w in [pos.truncation_note()] if w]
        embeds = np.repeat(pos.embeds, num_images, axis=0)
        pooled = np.repeat(pos.pooled, num_images, axis=0)
        if cfg:
            neg = self.prompts.encode(negative_prompt or "", max_sequence_length)
            warnings += [w for w in [neg.truncation_note("negative prompt")] if w]
            embeds = np.concatenate([np.repeat(neg.embeds, num_images, 0), embeds])
            pooled = np.concatenate([np.repeat(neg.pooled, num_images, 0), pooled])
        self._release("clip_l", "clip_g", "t5")
        timer.add("text_encoders", t0)

        t0 = time.perf_counter()
        post = self.runner("vae_encoder").run({"image": pixels.astype(self.float_dtype)})
        self._release("vae_encoder")
        mean, std = post["mean"].astype(np.float32), post["std"].astype(np.float32)
        init = mean + std * noise.posterior
        init = (init - f.vae_shift_factor) * f.vae_scaling_factor
        init = np.repeat(init, num_images, axis=0)
        latents = sch.scale_noise(init, sigma_run[0], noise.latents).astype(np.float32)
        timer.add("vae_encoder", t0)

        t0 = time.perf_counter()
        tr = self.runner("transformer")
        enc = embeds.astype(self.float_dtype)
        pool = pooled.astype(self.float_dtype)
        for i, t in enumerate(timesteps):
            model_in = np.concatenate([latents, latents]) if cfg else latents
            out = tr.run({
                "hidden_states": model_in.astype(self.float_dtype),
                "encoder_hidden_states": enc,
                "pooled_projections": pool,
                "timestep": np.full((model_in.shape[0],), t, dtype=np.float32),
            })["noise_pred"].astype(np.float32)
            if cfg:
                uncond, text = out[:num_images], out[num_images:]
                out = uncond + np.float32(guidance_scale) * (text - uncond)
            latents = sch.euler_step(latents, out, sigma_run[i], sigma_run[i + 1])
            if progress:
                progress(i + 1, len(timesteps))
        self._release("transformer")
        timer.add("denoise", t0)

        t0 = time.perf_counter()
        z = latents / np.float32(f.vae_scaling_factor) + np.float32(f.vae_shift_factor)
        decoded = self.runner("vae_decoder").run({"latent": z.astype(self.float_dtype)})["image"]
        self._release("vae_decoder")
        timer.add("vae_decoder", t0)
        t0 = time.perf_counter()
        decoded = decoded.astype(np.float32)
        images = imgs.postprocess(decoded)
        timer.add("image_out", t0)
        timer.add("total", t_all)
        return Result(images, timer.t, warnings, seed, decoded)

    def _noise(self, noise: Noise | None, seed: int | None, latent_shape: tuple) -> Noise:
        post_shape = (1,) + latent_shape[1:]
        if noise is None:
            rng = np.random.default_rng(seed)
            post = rng.standard_normal(post_shape, dtype=np.float32)
            lat = rng.standard_normal(latent_shape, dtype=np.float32)
            return Noise(lat, post)
        lat = np.asarray(noise.latents, dtype=np.float32)
        if lat.shape != latent_shape:
            raise Sd3trtError(
                f"noise 'latents' has shape {lat.shape}, this request needs {latent_shape} "
                "(num_images, latent channels, height/8, width/8)"
            )
        post = noise.posterior
        if post is None:
            post = np.random.default_rng(seed).standard_normal(post_shape, dtype=np.float32)
        post = np.asarray(post, dtype=np.float32)
        if post.shape != post_shape:
            raise Sd3trtError(f"noise 'posterior' has shape {post.shape}, this request needs {post_shape}")
        return Noise(lat, post)

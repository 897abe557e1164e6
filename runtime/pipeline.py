"""SD3 img2img over a bundle: the same steps as diffusers' StableDiffusion3Img2ImgPipeline, in numpy.

Embedding it (no files, no PIL needed)::

    import numpy as np
    import sd3trt

    pipe = sd3trt.Img2Img.from_bundle("bundle/", backend="onnxruntime")    # thread-safe; close() or `with`
    pixels = np.zeros((512, 512, 3), np.uint8)                              # uint8 HWC, or float CHW in [0, 1]
    plan = pipe.prepare(pixels, "a watercolor fox", strength=0.6, steps=28, seed=1)   # every check, no engine
    token = sd3trt.Cancel()                                                 # token.cancel() from any thread
    result = pipe.run(plan, cancel=token, progress=lambda i, n: None)       # raises sd3trt.Cancelled if cancelled
    result.array      # uint8 [N, H, W, 3]
    result.decoded    # float32 [N, 3, H, W] in [-1, 1]
    result.images     # PIL images, made on first use

`pipe(image, prompt, ...)` is prepare + run in one call. Images may also be paths, encoded bytes, PIL
images, DLPack tensors (torch, cupy; CUDA ones read on the caller's `stream`) or 3-D buffers; `out=`
writes the result into a caller's array or CUDA tensor. Bad requests raise RequestError (an
Sd3trtError, `.field` names the parameter); the library logs through `logging` and prints nothing.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Mapping

import numpy as np

from sd3trt.errors import Sd3trtError
from sd3trt.manifest import Bundle, load_bundle
from sd3trt.runtime import arrays
from sd3trt.runtime import images as imgs
from sd3trt.runtime import lora as lora_runtime
from sd3trt.runtime import plan as plans
from sd3trt.runtime import scheduler as sch
from sd3trt.runtime.builds import check_request, check_weights, choose_graphs, compressed_graphs
from sd3trt.runtime.cancel import check_token, stop_if_cancelled
from sd3trt.runtime.plan import Noise, Plan, RequestError
from sd3trt.runtime.prompts import PromptEncoder
from sd3trt.runtime.result import Result
from sd3trt.runtime.runners import BACKENDS, OrtRunner, Runner, RunnerPool
from sd3trt.spec import T5_DEFAULT_LENGTH
from sd3trt import precision as words

__all__ = ["Img2Img", "Noise", "Plan", "Result", "RequestError"]

DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 7.0
DEFAULT_STRENGTH = 0.6
TEXT_ENCODERS = ("clip_l", "clip_g", "t5")
log = logging.getLogger(__name__)


class Timer:
    def __init__(self):
        self.t: dict[str, float] = {}

    def add(self, key: str, since: float) -> None:
        self.t[key] = self.t.get(key, 0.0) + time.perf_counter() - since


class Img2Img:
    """One bundle's img2img pipeline. Safe to call from several threads at once (see runners.RunnerPool).

    backend: one of BACKENDS; "auto" picks the CPU backend, and the transformer precision where none is given,
    measured fastest on this kind of CPU (runtime/auto_backend.py; `auto_choice` says what it picked).
    transformer_precision / vae_precision: None runs the bundle's float graphs (onnxruntime) or the newest engine build (tensorrt); on onnxruntime "int8"/"fp8" pick the graphs of
    `sd3trt quantize`; on tensorrt a precision picks the engine build that has it, or is refused.
    onnx_files: {component: path} ONNX graphs to run in place of the bundle's (onnxruntime backends).
    prompt_cache: how many prompt embeddings to keep (0: encode every prompt every time).
    runner_factory(name) -> Runner replaces default_runner (e.g. to wrap it).
    loras: LoRAs merged into the weights at load time, without re-export ('PATH[:SCALE]' strings, paths,
    (path, scale) pairs or sd3trt.lora.LoraSpec); ONNX Runtime backends, float graphs (runtime/lora.py).
    cpu_precision: openvino backend: "auto" (the default: bf16 where the CPU has it natively), "fp32" or "bf16";
    bf16 runs only the graphs whose bf16 image passed `sd3trt gate` on this bundle (runtime/cpu_precision.py).
    weights: "w8" runs the 8-bit-weight graphs of `sd3trt compress-weights` (CPU backends) for the components
    that still run their bundle graph; a quantized transformer (transformer_precision) keeps its own graph.
    """

    def __init__(self, bundle: Bundle, backend: str = "onnxruntime", *, low_memory: bool = False,
                 runner_factory: Callable[[str], Runner] | None = None, threads: int = 0,
                 engine_build: str | None = None, transformer_precision: str | None = None,
                 vae_precision: str | None = None, onnx_files: Mapping[str, str | Path] | None = None,
                 prompt_cache: int = 16, loras=None, cpu_precision: str | None = None, weights: str | None = None):
        self.auto_choice = None  # backend "auto": what it chose (runtime/auto_backend.py)
        if backend == "auto":
            from sd3trt.runtime.auto_backend import choose

            self.auto_choice = choose(bundle, transformer_precision, loras)
            backend, transformer_precision = self.auto_choice.backend, self.auto_choice.transformer_precision
        if backend not in BACKENDS:
            raise Sd3trtError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
        if bundle.dtype == "bf16" and backend not in ("tensorrt", "openvino"):
            raise Sd3trtError(f"the {backend} backend cannot run a bf16 bundle; use --backend openvino, or export "
                              "with --dtype fp32 (or fp16)")
        check_weights(backend, weights)
        if cpu_precision is not None and backend != "openvino":
            raise Sd3trtError(f"cpu_precision is for the openvino backend, not {backend}; use --backend openvino "
                              "(ONNX Runtime runs the bundle's float graphs, or --precision int8)")
        self.bundle = bundle
        self.facts = bundle.facts
        self.backend = backend
        self.threads = threads
        loras = lora_runtime.read_for(bundle, backend, loras, transformer_precision, onnx_files or {})
        self._onnx_files, self.engine_build = choose_graphs(bundle, backend, engine_build, transformer_precision,
                                                           vae_precision, onnx_files or {})
        if weights is not None:
            self._onnx_files.update(compressed_graphs(bundle, self._onnx_files))
        self.loras, self._initializers = lora_runtime.overrides(bundle, loras, self._onnx_files)
        self.graph_precisions: Mapping[str, str] = MappingProxyType({})  # openvino: fp32/bf16 per component
        if backend == "openvino":
            from sd3trt.runtime.cpu_precision import graph_precisions

            self.graph_precisions = MappingProxyType(graph_precisions(bundle, cpu_precision, self._onnx_files))
        self.float_dtype = np.dtype(words.HOST_NUMPY[bundle.dtype])
        self._pool = RunnerPool(runner_factory or self.default_runner, low_memory)
        self.scheduler_config = sch.SchedulerConfig.from_dict(bundle.scheduler_config)
        dirs = {n: bundle.tokenizer_dir(n) for n in bundle.tokenizer_names()}
        self.prompts = PromptEncoder(self.facts, dirs, self._pool.get,
                                     plans.check_int(prompt_cache, "prompt_cache", 0))

    @classmethod
    def from_bundle(cls, path: str | Path, backend: str = "onnxruntime", **kw) -> "Img2Img":
        return cls(load_bundle(Path(path)), backend=backend, **kw)

    # ---------------------------------------------------------------- engines

    @property
    def onnx_files(self) -> Mapping[str, Path]:
        """Read-only: the ONNX file each component runs (onnxruntime and openvino; empty for tensorrt)."""
        return MappingProxyType(self._onnx_files)

    def default_runner(self, name: str) -> Runner:
        """A new runner for component `name` as this pipeline makes it without a runner_factory."""
        if self.backend == "tensorrt":
            from sd3trt.runtime.trt_runner import TrtRunner

            return TrtRunner.from_bundle(self.bundle, name, build=self.engine_build)
        if self.backend == "openvino":
            from sd3trt.runtime.ov_runner import OvRunner

            return OvRunner(name, self.bundle.component(name), self._onnx_files[name],
                            precision=self.graph_precisions[name], threads=self.threads)
        providers = None
        if self.backend != "onnxruntime":
            from sd3trt.runtime.ort_gpu import ort_gpu_providers

            providers = ort_gpu_providers("cuda" if self.backend == "onnxruntime-cuda" else "tensorrt", self.bundle)
        return OrtRunner(name, self.bundle.component(name), self._onnx_files[name], providers=providers,
                         threads=self.threads, initializers=self._initializers.get(name))

    def runner(self, name: str) -> Runner:
        """The loaded runner of component `name` (loaded now if it is not)."""
        return self._pool.get(name)

    @property
    def lora_components(self) -> tuple[str, ...]:
        """The components whose weights the load-time LoRAs change (their graphs run with merged weights)."""
        return tuple(sorted(self._initializers))

    @property
    def loaded_components(self) -> tuple[str, ...]:
        return self._pool.loaded()

    def load_all(self) -> None:
        """Load every engine now (servers do this at start; the first request is then not slower)."""
        for name in self.bundle.component_names():
            self._pool.get(name)

    def clear_prompt_cache(self) -> None:
        self.prompts.clear()

    def close(self) -> None:
        """Release every loaded engine (a TensorRT runner saves its runtime cache first). Idempotent;
        call it when no run is in flight."""
        self._pool.close()

    def __enter__(self) -> "Img2Img":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------- requests

    def prepare(self, image, prompt: str, negative_prompt: str | None = None, *,
                strength: float = DEFAULT_STRENGTH, steps: int = DEFAULT_STEPS,
                guidance_scale: float = DEFAULT_GUIDANCE, num_images: int = 1, seed: int | None = None,
                noise: Noise | None = None, max_sequence_length: int = T5_DEFAULT_LENGTH,
                sigmas: list[float] | None = None, mu: float | None = None,
                max_pixels: int | None = imgs.DEFAULT_MAX_PIXELS, stream=None) -> Plan:
        """Check a request and compute everything about it that needs no engine; RequestError if it is bad.

        image: path, encoded bytes, file object, PIL image, or pixels (runtime/arrays.py: uint8 [H, W, 3],
        float [3, H, W] in [0, 1], DLPack or buffer); `stream`: the CUDA stream a CUDA tensor is ready on.
        steps is ignored when custom `sigmas` are given. seed: None draws fresh noise; noise: Noise to use.
        """
        t0 = time.perf_counter()
        f = self.facts
        prompt = plans.check_text(prompt, "prompt")
        negative_prompt = plans.check_text(negative_prompt, "negative_prompt", optional=True)
        guidance_scale = plans.check_guidance(guidance_scale)
        num_images = plans.check_int(num_images, "num_images", 1)
        max_sequence_length = plans.check_int(max_sequence_length, "max_sequence_length", 1, f.t5_max_length)
        seed = plans.check_seed(seed)
        pixels, size, (width, height) = plans.read_image(image, f, max_pixels, stream)
        lh, lw = height // f.vae_scale_factor, width // f.vae_scale_factor
        timesteps, sigma_run, steps = plans.schedule(self.scheduler_config, steps, strength, sigmas, mu, (lh, lw),
                                                     f.patch_size)
        cfg = guidance_scale > 1.0
        build = None
        if self.backend == "tensorrt":  # a request the engines' profiles cannot take is refused here
            with plans.about("image"):
                build = check_request(self.bundle, height, width, num_images, cfg, max_sequence_length, self.engine_build)
        latent = plans.make_noise(noise, seed, (num_images, f.latent_channels, lh, lw))
        plan = Plan(plans.frozen(pixels), size, width, height, prompt, negative_prompt, float(strength), steps,
                    guidance_scale, cfg, num_images, max_sequence_length, plans.frozen(timesteps),
                    plans.frozen(sigma_run), latent, seed, build, time.perf_counter() - t0)
        log.debug("prepared %s", plan)
        return plan

    def __call__(self, image, prompt: str, negative_prompt: str | None = None, *,
                 strength: float = DEFAULT_STRENGTH, steps: int = DEFAULT_STEPS,
                 guidance_scale: float = DEFAULT_GUIDANCE, num_images: int = 1, seed: int | None = None,
                 noise: Noise | None = None, max_sequence_length: int = T5_DEFAULT_LENGTH,
                 sigmas: list[float] | None = None, mu: float | None = None,
                 max_pixels: int | None = imgs.DEFAULT_MAX_PIXELS, progress: Callable[[int, int], None] | None = None,
                 cancel=None, out=None, stream=None) -> Result:
        """prepare(...) then run(plan, ...); timings gain image_in (prepare's time), counted in total."""
        plan = self.prepare(image, prompt, negative_prompt, strength=strength, steps=steps,
                            guidance_scale=guidance_scale, num_images=num_images, seed=seed, noise=noise,
                            max_sequence_length=max_sequence_length, sigmas=sigmas, mu=mu, max_pixels=max_pixels,
                            stream=stream)
        result = self.run(plan, progress=progress, cancel=cancel, out=out, stream=stream)
        result.timings = {"image_in": plan.prepare_s, **result.timings}
        result.timings["total"] += plan.prepare_s
        return result

    def run(self, plan: Plan, *, progress: Callable[[int, int], None] | None = None, cancel=None,
            out=None, stream=None) -> Result:
        """Run a Plan from prepare. progress(i, n) after each denoising step; cancel: a Cancel (or
        threading.Event) checked before each stage and step, raising Cancelled; out: an array or CUDA tensor
        (uint8 [N, H, W, 3] or float32 [N, 3, H, W]) the result is also written into, on `stream`."""
        if not isinstance(plan, Plan):
            raise Sd3trtError(f"run takes a Plan from prepare(), got {type(plan).__name__}")
        check_token(cancel)
        if progress is not None and not callable(progress):
            raise Sd3trtError("progress must be a callable taking (step, steps)")
        timer, t_all, f, n = Timer(), time.perf_counter(), self.facts, plan.num_images
        warnings = []
        stop_if_cancelled(cancel, "before the text encoders")
        t0 = time.perf_counter()
        with self._pool.hold(*TEXT_ENCODERS):
            pos = self.prompts.encode(plan.prompt, plan.max_sequence_length)
            warnings += [w for w in [pos.truncation_note()] if w]
            embeds, pooled = np.repeat(pos.embeds, n, axis=0), np.repeat(pos.pooled, n, axis=0)
            if plan.cfg:
                neg = self.prompts.encode(plan.negative_prompt or "", plan.max_sequence_length)
                warnings += [w for w in [neg.truncation_note("negative prompt")] if w]
                embeds = np.concatenate([np.repeat(neg.embeds, n, 0), embeds])
                pooled = np.concatenate([np.repeat(neg.pooled, n, 0), pooled])
        timer.add("text_encoders", t0)

        stop_if_cancelled(cancel, "before the VAE encoder")
        t0 = time.perf_counter()
        with self._pool.hold("vae_encoder"):
            post = self._pool.get("vae_encoder").run({"image": plan.pixels.astype(self.float_dtype)})
        mean, std = post["mean"].astype(np.float32), post["std"].astype(np.float32)
        init = (mean + std * plan.noise.posterior - f.vae_shift_factor) * f.vae_scaling_factor
        latents = sch.scale_noise(np.repeat(init, n, axis=0), plan.sigmas[0], plan.noise.latents).astype(np.float32)
        timer.add("vae_encoder", t0)

        t0 = time.perf_counter()
        with self._pool.hold("transformer"):
            latents = self._denoise(plan, latents, embeds.astype(self.float_dtype), pooled.astype(self.float_dtype),
                                    progress, cancel)
        timer.add("denoise", t0)

        stop_if_cancelled(cancel, "before the VAE decoder")
        t0 = time.perf_counter()
        z = latents / np.float32(f.vae_scaling_factor) + np.float32(f.vae_shift_factor)
        with self._pool.hold("vae_decoder"):
            decoded = self._pool.get("vae_decoder").run({"latent": z.astype(self.float_dtype)})["image"]
        timer.add("vae_decoder", t0)
        t0 = time.perf_counter()
        decoded = decoded.astype(np.float32, copy=False)
        result = Result(imgs.to_uint8(decoded), decoded, timer.t, warnings, plan.seed)
        if out is not None:
            arrays.write_out(out, (result.array, result.decoded), stream)
        timer.add("image_out", t0)
        timer.add("total", t_all)
        log.debug("img2img %dx%d, %d step(s): %s", plan.width, plan.height, plan.steps_run, timer.t)
        return result

    def _denoise(self, plan: Plan, latents: np.ndarray, enc: np.ndarray, pool: np.ndarray, progress, cancel):
        tr, n, total = self._pool.get("transformer"), plan.num_images, plan.steps_run
        for i, t in enumerate(plan.timesteps):
            stop_if_cancelled(cancel, f"at step {i + 1} of {total}")
            model_in = np.concatenate([latents, latents]) if plan.cfg else latents
            out = tr.run({
                "hidden_states": model_in.astype(self.float_dtype),
                "encoder_hidden_states": enc,
                "pooled_projections": pool,
                "timestep": np.full((model_in.shape[0],), t, dtype=np.float32),
            })["noise_pred"].astype(np.float32)
            if plan.cfg:
                uncond, text = out[:n], out[n:]
                out = uncond + np.float32(plan.guidance_scale) * (text - uncond)
            latents = sch.euler_step(latents, out, plan.sigmas[i], plan.sigmas[i + 1])
            if progress is not None:
                progress(i + 1, total)
        return latents

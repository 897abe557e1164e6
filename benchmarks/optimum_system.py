"""The optimum-intel peers in a benchmark worker: OVStableDiffusion3Img2ImgPipeline on OpenVINO (CPU).

Runs in the peer environment (sd3trt.benchmarks.peer_env). The OpenVINO IR is exported once from the job's
diffusers model into `<cache>/optimum-intel/<digest of the model path>-<fp|int8>/` and reused:

- fp:   OVStableDiffusion3Pipeline.from_pretrained(model_dir, export=True, load_in_8bit=False), saved. The weights
        stay in the model's own precision (load_in_8bit=False: no 8-bit weight compression by model size).
- int8: the fp IR loaded with OVWeightQuantizationConfig(bits=8, quant_method="hybrid", dataset=<local prompts>,
        num_samples=...): optimum-intel's hybrid quantization for diffusion models. In the transformer, the
        layers with weights (linear MatMuls) get 8-bit weights and the others (attention's activation MatMuls, the
        patch-embedding convolution) int8 weights and activations, calibrated on the transformer's inputs while
        the pipeline generates from the prompts; the text encoders and the VAE get 8-bit weights. Data-aware
        quantization runs only on the text-to-image pipeline class (optimum-intel refuses it for image-to-image),
        so the quantized IR is made with OVStableDiffusion3Pipeline and loaded by the img2img class, which reads
        the same folders.

The precision OpenVINO computes in is its INFERENCE_PRECISION_HINT: bf16 where the CPU has AVX512_BF16 or AMX-BF16,
f32 elsewhere (a job's "ov_precision" overrides it). The latent noise and the VAE posterior's draw come from the
job, injected where diffusers draws them (optimum-intel runs diffusers' own StableDiffusion3Img2ImgPipeline.__call__
and samples the posterior with diffusers' DiagonalGaussianDistribution), as for the diffusers systems.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path

from sd3trt.benchmarks.worker import Clock, DiffusersRun, log

# Calibration prompts for the int8 transformer (no dataset hub here): varied subjects, styles and lighting.
CALIBRATION_PROMPTS = (
    "a watercolor painting of a lighthouse on a rocky shore at sunset, soft light, detailed",
    "a photo of a red fox sitting in fresh snow, morning light, shallow depth of field",
    "an oil painting of a busy harbour with fishing boats, impressionist style",
    "a close-up portrait of an old man with a grey beard, dramatic studio lighting",
    "a futuristic city skyline at night with neon signs and flying cars, cinematic",
    "a bowl of ripe fruit on a wooden table, still life, natural window light",
    "a mountain lake reflecting pine trees and snowy peaks, clear blue sky",
    "a pencil sketch of a cat sleeping on a windowsill",
    "a medieval castle on a hill in the fog, fantasy illustration",
    "a cup of coffee and a croissant on a cafe table, top view, warm tones",
)
# Transformer calls whose inputs calibrate the int8 transformer (optimum-intel collects one per denoising step
# of its calibration generations, 28 steps each): 4 prompts' worth.
CALIBRATION_CALLS = 112
PRECISION_HINTS = {"bf16": "bf16", "fp32": "f32", "f32": "f32"}


def export_dir(job: dict, int8: bool) -> Path:
    digest = hashlib.sha256(str(Path(job["model_dir"]).resolve()).encode()).hexdigest()[:12]
    return Path(job["cache_dir"]) / "optimum-intel" / f"{digest}-{'int8' if int8 else 'fp'}"


def _export_atomically(out: Path, make) -> None:
    """make(tmp_dir) writes the IR into a fresh folder next to `out`, which is then renamed to `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        make(tmp)
        try:
            os.rename(tmp, out)
        except OSError:
            if not (out / "model_index.json").is_file():  # not made meanwhile by another process
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _quiet_export() -> None:
    """Keep the benchmark's log readable: no tracer warnings or NNCF tables from the export."""
    import logging
    import warnings

    import nncf

    warnings.filterwarnings("ignore")
    nncf.set_log_level(logging.WARNING)


def ensure_export(job: dict, int8: bool) -> float:
    """The IR of the job's model (fp or int8) in the cache; returns the seconds spent making it (0 when cached)."""
    from optimum.intel import OVStableDiffusion3Pipeline, OVWeightQuantizationConfig

    out = export_dir(job, int8)
    if (out / "model_index.json").is_file():
        return 0.0
    _quiet_export()
    t0 = time.perf_counter()
    if int8:
        fp = export_dir(job, False)
        ensure_export(job, False)
        log(f"  {job['system']}: hybrid 8-bit quantization of {fp} ({CALIBRATION_CALLS} calibration calls) ...")
        config = OVWeightQuantizationConfig(bits=8, quant_method="hybrid", dataset=list(CALIBRATION_PROMPTS),
                                            num_samples=CALIBRATION_CALLS)

        def make(tmp: Path) -> None:
            OVStableDiffusion3Pipeline.from_pretrained(fp, quantization_config=config, compile=False).save_pretrained(tmp)
    else:
        log(f"  {job['system']}: exporting {job['model_dir']} to OpenVINO IR ...")

        def make(tmp: Path) -> None:
            OVStableDiffusion3Pipeline.from_pretrained(job["model_dir"], export=True, load_in_8bit=False,
                                                       compile=False).save_pretrained(tmp)
    _export_atomically(out, make)
    seconds = time.perf_counter() - t0
    log(f"  {job['system']}: IR in {out} ({seconds:.1f} s)")
    return seconds


class OptimumSystem(DiffusersRun):
    def __init__(self, job: dict, int8: bool):
        os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm's import: no progress bars from export/calibration
        import torch
        from diffusers.utils import logging as dlog
        from optimum.intel import OVStableDiffusion3Img2ImgPipeline
        from transformers.utils import logging as tlog

        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
        tlog.set_verbosity_error()
        self.torch = torch
        self.job = job
        threads = int(job.get("threads") or 0)
        if threads:
            torch.set_num_threads(threads)  # the pipeline's own torch work (scheduler, image processing)
        self.export_s = ensure_export(job, int8)
        from sd3trt.runtime.ov_runner import cpu_has_bf16  # OpenVINO's own word, as for sd3trt's systems

        hint = PRECISION_HINTS[job.get("ov_precision") or ("bf16" if cpu_has_bf16() else "f32")]
        # what its linear layers compute in (hybrid 8-bit dequantizes weights; only attention runs int8)
        self.precision = {"f32": "fp32"}.get(hint, hint)
        ov_config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": hint}
        if threads:
            ov_config["INFERENCE_NUM_THREADS"] = str(threads)
        pipe = OVStableDiffusion3Img2ImgPipeline.from_pretrained(export_dir(job, int8), ov_config=ov_config,
                                                                 compile=True)
        pipe.set_progress_bar_config(disable=True)
        log(f"  {job['system']}: OpenVINO {ov_config}")
        self.clock = Clock(label=job["system"])
        parts = {"clip_l": pipe.text_encoder, "clip_g": pipe.text_encoder_2, "t5": pipe.text_encoder_3,
                 "transformer": pipe.transformer, "vae_encoder": pipe.vae_encoder, "vae_decoder": pipe.vae_decoder}
        for name, part in parts.items():
            if part is not None:  # OVPipelinePart.__call__ calls self.forward: the OpenVINO inference, timed
                part.forward = self.clock.wrap(name, part.forward)
        self.pipe = pipe

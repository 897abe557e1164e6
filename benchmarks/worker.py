"""One system of a benchmark, in its own process: `python -m sd3trt.benchmarks.worker JOB.json`.

A process of its own per system keeps the peak RSS (ru_maxrss) of one system from mixing with
another's, and makes the cold start (process start to first image) real. The job file (written by
sd3trt.benchmarks.run) names the system, the model/bundle, the workload and where to write the result.

Module-level imports are the standard library and numpy only: an sd3trt system must not pay for torch.

Per run the worker records wall time end to end, and per component the time spent inside the engine
calls (diffusers: the text encoders' and transformer's forward, vae.encode / vae.decode; sd3trt: each
runner's engine execution, input validation excluded). For sd3trt also the runtime's own overhead:
end to end minus engine execution minus engine loading (loading happens inside runs in low-memory mode).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from sd3trt.memory import peak_rss_mib, proc_status_mib, ru_maxrss_mib

COMPONENTS = ("clip_l", "clip_g", "t5", "vae_encoder", "transformer", "vae_decoder")


_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_snapshot() -> tuple | None:
    """(wall s, system-wide busy CPU s, steal CPU s, this process's CPU s) for `other_cpu` below."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = v
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return time.time(), (user + nice + system + irq + softirq) / _HZ, steal / _HZ, ru.ru_utime + ru.ru_stime


def other_cpu(before: tuple | None, after: tuple | None) -> dict:
    """Share of the machine's CPU capacity used by other processes (and stolen by the hypervisor) between
    two snapshots: the evidence that a run was disturbed, independent of the load average's lag."""
    if not before or not after:
        return {}
    wall = after[0] - before[0]
    cap = wall * (os.cpu_count() or 1)
    if cap <= 0:
        return {}
    other = (after[1] - before[1]) - (after[3] - before[3])
    return {"other_cpu_frac": round(max(other, 0.0) / cap, 4), "steal_frac": round((after[2] - before[2]) / cap, 4)}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


SLOW_CALL_S = 10.0  # calls slower than this are reported as they finish (progress on slow systems)


class Clock:
    """Time per component call within the current run."""

    def __init__(self, sync=None, label: str = ""):
        self.calls: dict[str, list[float]] = {}
        self.sync = sync
        self.label = label

    def reset(self) -> None:
        self.calls = {}

    def add(self, name: str, seconds: float) -> None:
        self.calls.setdefault(name, []).append(seconds)
        if seconds > SLOW_CALL_S:
            log(f"  {self.label}: {name} call {len(self.calls[name])}: {seconds:.1f} s")

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            if self.sync:
                self.sync()
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if self.sync:
                    self.sync()
                self.add(name, time.perf_counter() - t0)

        return timed


# ---------------------------------------------------------------------------------------------- diffusers


class DiffusersRun:
    """One img2img request through a diffusers-style pipeline (self.pipe: diffusers' own, or optimum-intel's on
    OpenVINO) with the workload's noise injected; self.clock times the components."""

    def run(self, image, noise: dict) -> tuple[np.ndarray, dict]:
        from sd3trt.benchmarks.noise import injected_noise

        j = self.job
        self.clock.reset()
        with injected_noise(noise["latents"], noise["posterior"]), self.torch.no_grad():
            t0 = time.perf_counter()
            out = self.pipe(
                prompt=j["prompt"], negative_prompt=j["negative_prompt"], image=image, strength=j["strength"],
                num_inference_steps=j["steps"], guidance_scale=j["guidance"], num_images_per_prompt=j["num_images"],
                height=image.height, width=image.width, max_sequence_length=j["max_sequence_length"], output_type="np",
            ).images
            total = time.perf_counter() - t0
        return np.asarray(out, dtype=np.float32), {"total_s": total, "calls": self.clock.calls}


class DiffusersSystem(DiffusersRun):
    def __init__(self, job: dict, dtype: str, compile_transformer: bool):
        import torch
        from diffusers import StableDiffusion3Img2ImgPipeline
        from diffusers.utils import logging as dlog
        from transformers.utils import logging as tlog

        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
        self.torch = torch
        self.job = job
        if job.get("threads"):
            torch.set_num_threads(job["threads"])
        device = job.get("device", "cpu")
        self.device = device
        tdtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        pipe = StableDiffusion3Img2ImgPipeline.from_pretrained(job["model_dir"], dtype=tdtype)
        pipe = pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        if compile_transformer:
            pipe.transformer = torch.compile(pipe.transformer)
        self.clock = Clock(sync=torch.cuda.synchronize if device.startswith("cuda") else None, label=job["system"])
        modules = {"clip_l": pipe.text_encoder, "clip_g": pipe.text_encoder_2, "t5": pipe.text_encoder_3,
                   "transformer": pipe.transformer}
        for name, m in modules.items():
            if m is not None:
                m.forward = self.clock.wrap(name, m.forward)
        pipe.vae.encode = self.clock.wrap("vae_encoder", pipe.vae.encode)
        pipe.vae.decode = self.clock.wrap("vae_decoder", pipe.vae.decode)
        self.pipe = pipe


# ---------------------------------------------------------------------------------------------- sd3trt


class TimedRunner:
    """Wraps a runtime Runner: validation (check) outside, engine execution (execute) inside the timed window."""

    def __init__(self, inner, clock: Clock):
        self.inner = inner
        self.clock = clock
        self.name = inner.name

    def run(self, feeds):
        self.inner.check(feeds)
        t0 = time.perf_counter()
        out = self.inner.execute(feeds)
        self.clock.add(self.name, time.perf_counter() - t0)
        return out

    def close(self):
        self.inner.close()


class Sd3trtSystem:
    def __init__(self, job: dict, backend: str, low_memory: bool, transformer_precision: str | None,
                 vae_precision: str | None = None, cpu_precision: str | None = None):
        from sd3trt.runtime.pipeline import Img2Img

        self.job = job
        self.clock = Clock(label=job["system"])
        self.loads: list[float] = []

        def factory(name: str):  # the pipeline's own runner (quantized graphs, engine build), timed
            t0 = time.perf_counter()
            inner = self.pipe.default_runner(name)
            self.loads.append(time.perf_counter() - t0)
            return TimedRunner(inner, self.clock)

        # Without the prompt cache the prompts are encoded on every request, as diffusers does.
        self.pipe = Img2Img.from_bundle(job["bundle_dir"], backend=backend, low_memory=low_memory,
                                        runner_factory=factory, threads=int(job.get("threads") or 0),
                                        transformer_precision=transformer_precision, vae_precision=vae_precision,
                                        prompt_cache=16 if job.get("prompt_cache") else 0, cpu_precision=cpu_precision)
        if not low_memory:
            self.pipe.load_all()  # like a server at start; the cold start counts it either way

    def run(self, image, noise: dict) -> tuple[np.ndarray, dict]:
        from sd3trt.runtime.plan import Noise

        j = self.job
        self.clock.reset()
        self.loads.clear()
        t0 = time.perf_counter()
        res = self.pipe(
            image, j["prompt"], negative_prompt=j["negative_prompt"], strength=j["strength"], steps=j["steps"],
            guidance_scale=j["guidance"], num_images=j["num_images"],
            noise=Noise(noise["latents"], noise["posterior"]), max_sequence_length=j["max_sequence_length"],
        )
        total = time.perf_counter() - t0
        out = np.clip(res.decoded / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1).astype(np.float32)
        return out, {"total_s": total, "calls": self.clock.calls, "load_s": float(sum(self.loads)),
                     "stages": dict(res.timings), "graph_precisions": dict(self.pipe.graph_precisions)}


# ---------------------------------------------------------------------------------------------- main


def make_system(job: dict):
    name = job["system"]
    if name.startswith("optimum-intel-"):
        from sd3trt.benchmarks.optimum_system import OptimumSystem

        return OptimumSystem(job, int8=name.endswith("-int8"))
    if name.startswith("diffusers-"):
        compile_ = name.startswith("diffusers-compile-")
        return DiffusersSystem(job, name.rsplit("-", 1)[1], compile_)
    if name == "sd3trt-ort-fp32":
        return Sd3trtSystem(job, "onnxruntime", False, None)
    if name == "sd3trt-ort-fp32-lowmem":
        return Sd3trtSystem(job, "onnxruntime", True, None)
    if name == "sd3trt-ort-int8":
        return Sd3trtSystem(job, "onnxruntime", False, "int8")
    if name == "sd3trt-ort-int8-vae":
        return Sd3trtSystem(job, "onnxruntime", False, "int8", "int8")
    if name.startswith("sd3trt-openvino-int8"):
        return Sd3trtSystem(job, "openvino", False, "int8", "int8" if name.endswith("-vae") else None, "auto")
    if name.startswith("sd3trt-openvino-"):
        return Sd3trtSystem(job, "openvino", False, None, cpu_precision=name.rsplit("-", 1)[1])
    if name == "sd3trt-trt":
        return Sd3trtSystem(job, "tensorrt", False, None)
    raise ValueError(f"unknown system {name}")


def _save(job: dict, result: dict) -> None:
    tmp = Path(job["result"]).with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, job["result"])


def run_job(job: dict) -> dict:
    """Runs the system; the result file is rewritten after each phase (status "running"), so a worker
    stopped by the time limit still leaves what it measured."""
    from PIL import Image

    t_spawn = float(job["spawn_time"])
    name = job["system"]
    result: dict = {"system": name, "status": "running", "pid": os.getpid()}
    t_start = time.time()
    result["python_start_s"] = t_start - t_spawn  # interpreter start-up and the worker's own imports
    with Image.open(job["image"]) as im:
        image = im.convert("RGB")
    with np.load(job["noise"]) as z:
        noise = {"latents": z["latents"], "posterior": z["posterior"]}

    t0 = time.time()
    system = make_system(job)
    t_loaded = time.time()
    if getattr(system, "export_s", 0.0):  # a peer's one-time IR export (then cached): neither loading nor cold start
        result["export_s"] = system.export_s
        t0, t_spawn = t0 + system.export_s, t_spawn + system.export_s
    result["load_s"] = t_loaded - t0
    if getattr(system, "precision", None):  # what a peer computes in, decided on this CPU
        result["precision"] = system.precision
    result["rss_after_load_mib"] = proc_status_mib("VmRSS")
    _save(job, result)
    log(f"  {name}: loaded in {t_loaded - t0:.1f} s (process start to loaded {t_loaded - t_spawn:.1f} s); first image ...")

    snap = cpu_snapshot()
    out, first = system.run(image, noise)
    first.update(other_cpu(snap, cpu_snapshot()))
    t_first = time.time()
    result["cold_start_s"] = t_first - t_spawn
    result["first_image_s"] = first["total_s"]
    np.save(job["image_out"], out)
    result["first_run"] = first
    _save(job, result)
    log(f"  {name}: first image {first['total_s']:.2f} s, cold start {result['cold_start_s']:.1f} s")

    for i in range(int(job.get("warmup", 0))):
        _, r = system.run(image, noise)
        log(f"  {name}: warm-up {i + 1}/{job['warmup']} {r['total_s']:.2f} s")
    runs = []
    reps = int(job["reps"])
    # Runs disturbed by other processes (more than max_other_cpu of the machine) do not count towards
    # `reps`; up to `extra_reps` more runs replace them. All runs are kept; the report filters.
    limit = float(job.get("max_other_cpu", 1.0))
    max_runs = reps + int(job.get("extra_reps", 0))
    clean = 0
    while clean < reps and len(runs) < max_runs:
        load = os.getloadavg()[0]
        snap = cpu_snapshot()
        _, r = system.run(image, noise)
        r.update(other_cpu(snap, cpu_snapshot()))
        r["loadavg_1m_before"] = load
        runs.append(r)
        disturbed = r.get("other_cpu_frac", 0.0) > limit
        clean += not disturbed
        result["runs"] = runs
        _save(job, result)
        tr = r["calls"].get("transformer", [])
        per = f", transformer {np.median(tr):.3f} s/call" if tr else ""
        note = f" (disturbed: other processes used {100 * r['other_cpu_frac']:.0f}% of the CPUs; not counted)" if disturbed else ""
        log(f"  {name}: run {len(runs)} ({clean}/{reps} clean) {r['total_s']:.2f} s{per}{note}")
    result["runs"] = runs
    result["status"] = "ok"
    result["peak_rss_mib"] = peak_rss_mib()
    result["ru_maxrss_mib"] = ru_maxrss_mib()  # includes the parent's RSS at fork (see peak_rss_mib)
    result["torch_loaded"] = "torch" in sys.modules
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    job = json.loads(Path(argv[0]).read_text())
    try:
        result = run_job(job)
    except BaseException as e:  # the orchestrator reports the failure; the table lists it as failed
        result = {"system": job.get("system"), "status": "failed",
                  "error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}",
                  "traceback": traceback.format_exc()[-4000:], "peak_rss_mib": peak_rss_mib()}
        log(result["traceback"])
    _save(job, result)
    return 0 if result["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())

"""The benchmark orchestrator: model, workload, peaks, one subprocess per system, projection, report.

    cfg = BenchConfig(model="medium-width", steps=8, reps=2)
    report = run_bench(cfg)          # also writes <out>/<name>.json, .md, .png

Every system runs in a fresh Python process (sd3trt.benchmarks.worker): its peak RSS is its own, and its
cold start is measured from the moment the orchestrator launches it to its first image. Systems run one
after another, never side by side, and the 1-minute load average before each run is recorded with it, so
a run disturbed by other work on the machine can be recognised in the results.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sd3trt.benchmarks import models as mdl
from sd3trt.benchmarks import systems as sysm
from sd3trt.spec import T5_DEFAULT_LENGTH

DEFAULT_OUT = "sd3trt-bench"  # under the working directory: <machine>/ per machine
DEFAULT_PROMPT = "a watercolor painting of a lighthouse on a rocky shore at sunset, soft light, detailed"
DEFAULT_NEGATIVE = "blurry, low quality, deformed"


@dataclass
class BenchConfig:
    model: str = "medium-width"
    layers: int = 2
    encoder_layers: int = 2
    dtype: str | None = None  # the generated model's and the bundle's float type (None: models.default_dtype)
    model_dir: str | None = None  # bench an existing diffusers model instead of a generated one
    bundle_dir: str | None = None  # ... and its sd3trt bundle (exported into the cache when not given)
    width: int = 512
    height: int = 512
    steps: int = 28
    strength: float = 0.6
    guidance: float = 7.0
    num_images: int = 1
    reps: int = 3
    warmup: int = 0  # warm runs after the first (cold) image, before the measured ones
    systems: list = field(default_factory=lambda: list(sysm.DEFAULT_SYSTEMS))
    compile: bool = False
    peers: bool = False  # the optimum-intel peers (their own environment, built on first use)
    quantize: bool = False
    threads: int = 0  # 0: every usable CPU
    device: str = "auto"  # diffusers' device: auto | cpu | cuda
    prompt: str = DEFAULT_PROMPT
    negative_prompt: str = DEFAULT_NEGATIVE
    max_sequence_length: int = T5_DEFAULT_LENGTH
    seed: int = 0
    cache_dir: str | None = None
    out_dir: str | None = None
    machine: str | None = None
    name: str | None = None
    project_layers: int = 0  # 0: no projection; else a second model with this many layers per component
    project_to: str = "sd3-medium"
    project_reps: int = 1
    system_reps: dict = field(default_factory=dict)  # per-system measured runs (slow systems), else `reps`
    project_systems: list | None = None  # default: every system that ran, low-memory mode excepted
    timeout_s: float = 3600.0
    gate_psnr_db: float = sysm.GATE_PSNR_DB
    peak_budget_s: float = 90.0
    max_other_cpu: float = sysm.MAX_OTHER_CPU
    extra_reps: int = 3  # runs allowed in addition to `reps` to replace disturbed ones
    peaks: bool = True
    prompt_cache: bool = False
    keep_work: bool = False
    quick: bool = False


QUICK = dict(model="tiny", layers=2, width=64, height=64, steps=4, reps=2, warmup=0, project_layers=0,
             peak_budget_s=3.0, timeout_s=300.0, extra_reps=0)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _threads(cfg: BenchConfig) -> int:
    if cfg.threads:
        return cfg.threads
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _device(cfg: BenchConfig) -> str:
    if cfg.device != "auto":
        return cfg.device
    return "cuda" if sysm.gpu_present() else "cpu"


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sd3trt" / "bench"


def _env(threads: int) -> dict:
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[k] = str(threads)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run_subprocess(args: list[str], threads: int, timeout_s: float) -> tuple[int | None, float]:
    """Run a child with stdout/stderr passed through (progress lines). Returns (returncode or None on timeout, seconds)."""
    t0 = time.time()
    proc = subprocess.Popen(args, env=_env(threads), start_new_session=True)
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        import signal

        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rc = None
    return rc, time.time() - t0


def run_system(system: str, job: dict, work: Path, threads: int, timeout_s: float) -> dict:
    """One worker process; its result dict (status ok / failed / timeout)."""
    job = dict(job, system=system, result=str(work / f"{system}.result.json"), image_out=str(work / f"{system}.npy"))
    job_path = work / f"{system}.job.json"
    python = sys.executable
    if system.startswith("optimum-intel-"):  # the peers run in a venv of their own (sd3trt.benchmarks.peer_env)
        from sd3trt.benchmarks import peer_env

        try:
            python = str(peer_env.python_for(Path(job["cache_dir"]), log))
        except peer_env.PeerEnvError as e:
            return {"system": system, "status": "skipped", "reason": str(e)}
    job["spawn_time"] = time.time()
    job_path.write_text(json.dumps(job))
    rc, secs = _run_subprocess([python, "-m", "sd3trt.benchmarks.worker", str(job_path)], threads, timeout_s)
    try:
        res = json.loads(Path(job["result"]).read_text())
    except (OSError, ValueError):
        res = {"system": system, "status": "failed", "error": f"the worker left no result (exit code {rc})"}
    if rc is None or res.get("status") == "running":
        done = ""
        if res.get("first_image_s"):
            done = f"; its first image took {res['first_image_s']:.1f} s and {len(res.get('runs', []))} measured runs finished"
        elif res.get("load_s"):
            done = f"; it loaded in {res['load_s']:.1f} s but finished no image"
        why = f"stopped after the {timeout_s:.0f} s limit (--timeout)" if rc is None else f"the worker exited ({rc})"
        res = {**res, "status": "timeout" if rc is None else "failed", "error": why + done}
    res["wall_s"] = secs
    if python != sys.executable:
        res["versions"] = peer_env.versions(python)
    if res["status"] == "ok" and Path(job["image_out"]).is_file():
        res["image_npy"] = job["image_out"]
    return res


def measure_peaks(cfg: BenchConfig, work: Path, threads: int, model: Path) -> dict:
    from sd3trt.benchmarks.flops import layer_shapes
    from sd3trt.spec import CLIP_MAX_LENGTH

    out = work / "peaks.json"
    batch = cfg.num_images * (2 if cfg.guidance > 1 else 1)
    shapes = layer_shapes(mdl.transformer_config(model), cfg.height // 8, cfg.width // 8,
                          CLIP_MAX_LENGTH + cfg.max_sequence_length, batch)
    log(f"measuring matmul peaks (fp32 / bf16 / int8, {threads} threads, ~{cfg.peak_budget_s:.0f} s) ...")
    rc, _ = _run_subprocess([sys.executable, "-m", "sd3trt.benchmarks.peak", str(out), str(threads),
                             str(cfg.peak_budget_s), json.dumps(shapes)], threads, max(120.0, cfg.peak_budget_s * 6))
    try:
        return json.loads(out.read_text())
    except (OSError, ValueError):
        return {"error": f"the peak measurement failed (exit code {rc})", "peaks": {}}


def _missing(bundle: Path, precision: str, component: str) -> bool:
    from sd3trt.errors import Sd3trtError
    from sd3trt.manifest import load_bundle

    try:
        load_bundle(bundle).quantized_entry(precision, component)
        return False
    except Sd3trtError:
        return True


def _maybe_quantize(cfg: BenchConfig, bundle: Path) -> None:
    """--quantize: make the INT8 transformer (and, for the int8 VAE systems, the INT8 VAE decoder) when missing,
    then the bf16 gate of the OpenVINO systems."""
    if not cfg.quantize:
        return
    from sd3trt.engines.calibrate import CalibSettings
    from sd3trt.errors import Sd3trtError

    # 8 runs x 10 steps: the calibration the committed results were measured with (the CLI's default is 12 x 28).
    settings = CalibSettings(prompts=8, holdout=2, steps=10, size=min(cfg.width, cfg.height))
    if cfg.quick:
        settings = CalibSettings(prompts=3, holdout=1, steps=3, size=min(cfg.width, cfg.height))
    todo = []
    int8 = {n for n in cfg.systems if "-int8" in n and n.startswith("sd3trt-")}
    int8_vae = {n for n in int8 if n.endswith("-vae")}
    if int8 and _missing(bundle, "int8", "transformer"):
        todo.append("transformer")
    if int8_vae and _missing(bundle, "int8", "vae_decoder"):
        todo.append("vae_decoder")
    for component in todo:
        log(f"quantizing the {component} of {bundle} to int8 (sd3trt quantize) ...")
        try:
            if component == "transformer":
                from sd3trt.engines.transformer_quant import quantize_bundle

                quantize_bundle(bundle, "int8", settings, threads=_threads(cfg), log=lambda s: log("  quantize " + s))
            else:
                from sd3trt.engines.vae_quant import quantize_vae

                quantize_vae(bundle, component, settings, threads=_threads(cfg), log=lambda s: log("  quantize " + s))
        except Sd3trtError as e:
            log(f"  quantize failed: {e}")
    _maybe_gate(cfg, bundle)


def _maybe_gate(cfg: BenchConfig, bundle: Path) -> None:
    """--quantize with OpenVINO systems on a bf16 CPU: run `sd3trt gate` when a graph of the bundle has no verdict
    on its present file (a re-quantized graph's old verdict does not count)."""
    from sd3trt.manifest import load_bundle

    data = load_bundle(bundle)
    if not (set(sysm.OPENVINO) - {"sd3trt-openvino-fp32"}) & set(cfg.systems) or data.dtype != "fp32" or \
            sysm.openvino_skip("sd3trt-openvino-fp32", data):
        return  # the gate measures an fp32 bundle's graphs in bf16 (a bf16 bundle's are bf16 already)
    from sd3trt.engines.cpu_gate import GateSettings, gate_bf16, graphs_of
    from sd3trt.runtime.cpu_precision import GATE_KEY, graph_key
    from sd3trt.runtime.ov_runner import cpu_has_bf16

    record = data.cpu_gate(GATE_KEY).get("graphs", {})
    shas = {key: graph_key(data, component, path)[1] for key, (component, path) in graphs_of(data).items()}
    if not cpu_has_bf16() or all(record.get(key, {}).get("sha256") == sha for key, sha in shas.items()):
        return
    settings = GateSettings(runs=1, steps=4, size=64) if cfg.quick else GateSettings()
    log(f"gating bf16 on OpenVINO for the graphs of {bundle} (sd3trt gate) ...")
    gate_bf16(bundle, settings, threads=_threads(cfg), log=lambda s: log("  " + s))


def _workload(cfg: BenchConfig, bundle: Path, work: Path) -> dict:
    import numpy as np

    from sd3trt.benchmarks.noise import make_noise, picture
    from sd3trt.manifest import load_bundle

    facts = load_bundle(bundle).facts
    m = facts.pixel_multiple
    w, h = cfg.width - cfg.width % m, cfg.height - cfg.height % m
    if (w, h) != (cfg.width, cfg.height):
        raise ValueError(f"image size {cfg.width}x{cfg.height} must be a multiple of {m} (VAE x patch)")
    picture(w, h, cfg.seed).save(work / "input.png")
    noise = make_noise(cfg.num_images, facts.latent_channels, h // facts.vae_scale_factor, w // facts.vae_scale_factor,
                       cfg.seed + 1)
    np.savez(work / "noise.npz", **noise)
    return {
        "image": str(work / "input.png"), "noise": str(work / "noise.npz"), "prompt": cfg.prompt,
        "negative_prompt": cfg.negative_prompt, "steps": cfg.steps, "strength": cfg.strength,
        "guidance": cfg.guidance, "num_images": cfg.num_images, "max_sequence_length": cfg.max_sequence_length,
        "prompt_cache": cfg.prompt_cache, "max_other_cpu": cfg.max_other_cpu, "extra_reps": cfg.extra_reps,
    }


def _run_systems(cfg: BenchConfig, names: list[str], model: Path, bundle: Path, work: Path, threads: int,
                 device: str, reps: int, label: str, system_reps: dict | None = None) -> dict:
    from sd3trt.benchmarks import fit
    from sd3trt.manifest import load_bundle

    base = _workload(cfg, bundle, work)
    base.update(model_dir=str(model), bundle_dir=str(bundle), reps=reps, warmup=cfg.warmup, threads=threads,
                device=device, cache_dir=str(Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()))
    flags = _cpu_flags()
    weights, available, dtype = fit.weights(model), fit.available_bytes(), load_bundle(bundle).dtype
    what = cfg.model if not cfg.model_dir else f"the model in {model}"
    if weights:
        log(label + fit.summary(weights, available, what))
    out = {}
    runnable = []
    for s in names:
        reason = sysm.skip_reason(s, bundle, flags, cfg.compile, device, cfg.peers)
        in_ram = s != "sd3trt-trt" and not (s.startswith("diffusers-") and device != "cpu")  # not on a GPU
        if not reason and in_ram:
            reason = fit.skip_reason(s, weights, dtype, available, what)
        if reason:
            out[s] = {"system": s, "status": "skipped", "reason": reason}
            log(f"{label}{s}: skipped - {reason}")
        else:
            runnable.append(s)
    for i, s in enumerate(runnable, 1):
        load = os.getloadavg()[0]
        log(f"{label}[{i}/{len(runnable)}] {s}: starting ({sysm.SYSTEMS[s]}; load average {load:.2f})")
        job = dict(base, reps=(system_reps or {}).get(s, reps))
        res = run_system(s, job, work, threads, cfg.timeout_s)
        res["loadavg_1m_at_start"] = load
        out[s] = res
        if res["status"] != "ok":
            log(f"{label}{s}: {res['status']} - {res.get('error') or res.get('reason')}")
    return out


def _digest(path: Path) -> str:
    import hashlib

    return hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:12]


def _cpu_flags() -> list[str]:
    from sd3trt.cpu import cpuinfo

    return cpuinfo().get("flags", [])


def run_bench(cfg: BenchConfig) -> dict:
    from sd3trt.benchmarks import machine as mach
    from sd3trt.benchmarks import report as rep
    from sd3trt.benchmarks.report_tables import headline
    from sd3trt.benchmarks.targets import accuracy as image_accuracy

    t_start = time.time()
    desc = mach.describe()
    threads, device = _threads(cfg), _device(cfg)
    machine = cfg.machine or mach.slug(desc)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else Path(DEFAULT_OUT) / machine
    cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    log(f"machine {machine}: {desc['cpu']['model']}, {desc['cpu']['usable_cpus']} CPUs "
        f"({' '.join(desc['cpu']['key_flags'])}), {desc['memory_gib']} GiB; {threads} threads; diffusers on {device}")

    spec = mdl.ModelSpec(cfg.model, cfg.layers, cfg.encoder_layers, cfg.seed, cfg.dtype or "")
    if cfg.model in mdl.FULL_SHAPES and not cfg.model_dir:
        log(f"{cfg.model} is the full architecture in {spec.dtype}: its model and bundle are built once into "
            f"{cache} (minutes, tens of GB of disk); a system whose weights would not fit in this machine's "
            "memory is skipped, saying what would")
    if cfg.model_dir:
        model = Path(cfg.model_dir)
        dtype = cfg.dtype or "fp32"
        bundle = Path(cfg.bundle_dir) if cfg.bundle_dir else cache / f"external-{_digest(model)}" / f"bundle-{dtype}"
        if not cfg.bundle_dir:
            from sd3trt.export.bundle import export_bundle
            from sd3trt.errors import Sd3trtError
            from sd3trt.manifest import load_bundle

            try:
                load_bundle(bundle)
            except Sd3trtError:
                export_bundle(model, bundle, dtype=dtype, overwrite=True, log=lambda s: log("  export " + s))
    else:
        model, bundle = mdl.prepare_apart(spec, cache, log)
    _maybe_quantize(cfg, bundle)

    work = Path(tempfile.mkdtemp(prefix="sd3trt-bench-", dir=cache if cache.is_dir() else None))
    try:
        peaks = measure_peaks(cfg, work, threads, model) if cfg.peaks else {"skipped": "--no-peaks", "peaks": {}}
        results = _run_systems(cfg, cfg.systems, model, bundle, work, threads, device, cfg.reps, "", cfg.system_reps)
        accuracy = image_accuracy(results, cfg.gate_psnr_db)
        projection = None
        if cfg.project_layers and not cfg.model_dir and cfg.project_layers != cfg.layers:
            projection = _projection(cfg, spec, cache, work, threads, device, results)
    finally:
        if not cfg.keep_work:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"work files kept in {work}")

    tr_cfg = mdl.transformer_config(model)
    report = rep.build_report(
        cfg=asdict(cfg), machine=machine, desc=desc, threads=threads, device=device, model_spec=asdict(spec),
        model_depth=spec.depth if not cfg.model_dir else None, transformer_config=tr_cfg, bundle=str(bundle),
        peaks=peaks, results=results, accuracy=accuracy, projection=projection,
        bf16_note=sysm.bf16_note(desc["cpu"]["flags"], device), seconds=time.time() - t_start,
    )
    name = cfg.name or rep.default_name(cfg, spec)
    paths = rep.write_outputs(report, out_dir, name)
    for p in paths.values():
        if p:
            log(f"wrote {p}")
    print("\n" + headline(report), flush=True)
    return report


def _projection(cfg: BenchConfig, spec: mdl.ModelSpec, cache: Path, work: Path, threads: int, device: str,
                base_results: dict) -> dict:
    """Per-layer cost from a second model with more layers; per component and system, scaled to full depth."""
    from sd3trt.benchmarks.projection import project

    spec2 = spec.with_layers(cfg.project_layers, cfg.project_layers)
    log(f"projection: a {spec2.key} model for per-layer costs (components measured at two depths) ...")
    model2, bundle2 = mdl.prepare_apart(spec2, cache, log)
    _maybe_quantize(cfg, bundle2)
    names = [s for s, r in base_results.items() if r["status"] == "ok" and not s.endswith("-lowmem")
             and (cfg.project_systems is None or s in cfg.project_systems)]
    work2 = work / "projection"
    work2.mkdir()
    res2 = _run_systems(cfg, names, model2, bundle2, work2, threads, device, cfg.project_reps, "projection: ")
    return project(cfg, spec, spec2, base_results, res2, mdl.FULL_DEPTH[cfg.project_to], cfg.project_to)

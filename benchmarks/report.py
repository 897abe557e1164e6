"""The benchmark report: assembled from the workers' raw results (kept in the JSON under `raw`) and written
as JSON, Markdown (report_tables.py) and PNG (report_plot.py); `rebuild(json_path)` re-renders a saved
result without running anything again.

  stats.py        per-system statistics        targets.py      accuracy gate and targets
  projection.py   steps / full-depth projections
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from sd3trt.benchmarks import flops as fl
from sd3trt.benchmarks import systems as sysm
from sd3trt.benchmarks.projection import denoise_calls, steps_projection
from sd3trt.benchmarks.report_plot import plot_png
from sd3trt.benchmarks.report_tables import markdown
from sd3trt.benchmarks.stats import apply_peaks, summarize
from sd3trt.benchmarks.targets import regate, targets

SCHEMA = 1


def build_report(*, cfg, machine, desc, threads, device, model_spec, model_depth, transformer_config, bundle,
                 peaks, results, accuracy, projection, bf16_note, seconds) -> dict:
    from sd3trt.spec import CLIP_MAX_LENGTH

    f = 8  # VAE factor of every SD3 model
    lh, lw = cfg["height"] // f, cfg["width"] // f
    cfg_on = cfg["guidance"] > 1.0
    batch = cfg["num_images"] * (2 if cfg_on else 1)
    text_seq = CLIP_MAX_LENGTH + cfg["max_sequence_length"]
    fcount = fl.transformer_call_flops(transformer_config, lh, lw, text_seq, batch)
    max_other = cfg.get("max_other_cpu", sysm.MAX_OTHER_CPU)
    summ = {n: summarize(r, fcount["total"], max_other) for n, r in results.items()}
    for n, a in accuracy.get("systems", {}).items():
        if n in summ:
            summ[n]["accuracy"] = a
    notes = apply_peaks(summ, peaks)
    if bf16_note and any(n.endswith("bf16") for n in results):
        notes.append(bf16_note)
    disturbed = [n for n, s in summ.items() if s.get("status") == "ok" and not s["undisturbed"]]
    dropped = {n: s["runs_total"] - s["runs_used"] for n, s in summ.items()
               if s.get("status") == "ok" and s["undisturbed"] and s["runs_total"] > s["runs_used"]}
    if dropped:
        notes.append("runs during which other processes used more than "
                     f"{100 * max_other:.0f}% of the machine's CPUs were measured but left out of the statistics: "
                     + ", ".join(f"{n} {k}" for n, k in dropped.items()))
    if disturbed:
        notes.append("every measured run of " + ", ".join(disturbed) + " was disturbed by other processes (more "
                     f"than {100 * max_other:.0f}% of the CPUs): treat those timings as upper bounds")
    raw = {}
    for n, r in results.items():
        raw[n] = {k: v for k, v in r.items() if k not in ("image_npy", "traceback")}
        if "traceback" in r:
            raw[n]["traceback_tail"] = r["traceback"][-1500:]
    return {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(seconds, 1),
        "machine": {"name": machine, **desc},
        "threads": threads,
        "diffusers_device": device,
        "config": cfg,
        "model": {"spec": model_spec, "depth": model_depth, "transformer_config": transformer_config, "bundle": bundle},
        "workload": {"width": cfg["width"], "height": cfg["height"], "steps": cfg["steps"], "strength": cfg["strength"],
                     "guidance": cfg["guidance"], "cfg": cfg_on, "num_images": cfg["num_images"],
                     "transformer_batch": batch, "text_seq": text_seq, "latent": [lh, lw],
                     "transformer_calls": denoise_calls(cfg["steps"], cfg["strength"])},
        "transformer_flops_per_call": fcount,
        "peaks": peaks,
        "systems": {n: {"description": sysm.SYSTEMS.get(n, n), **s} for n, s in summ.items()},
        "accuracy": accuracy,
        "targets": targets(summ, accuracy, projection),
        "steps_projection": steps_projection(summ, cfg) if cfg["steps"] != 28 else None,
        "projection": projection,
        "notes": notes,
        "raw": raw,
    }


def default_name(cfg, spec) -> str:
    model = spec.key if not cfg.model_dir else "external-" + Path(cfg.model_dir).name
    name = f"{model}_{cfg.width}x{cfg.height}_{cfg.steps}steps"
    if cfg.num_images != 1:
        name += f"_x{cfg.num_images}"
    return name


def write_outputs(rep: dict, out_dir: Path, name: str) -> dict:
    """<name>.json, <name>.md, <name>.png in out_dir, each written atomically (temp file + rename)."""
    from sd3trt.files import write_bytes_atomic

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = plot_png(rep)
    rep["files"] = {"json": f"{name}.json", "markdown": f"{name}.md", "plot": f"{name}.png" if png else None}
    rep["notes"] = [n for n in rep["notes"] if not n.startswith("no plot:")]  # a rebuild may have matplotlib now
    if png is None:
        rep["notes"].append("no plot: matplotlib is not installed (pip install matplotlib)")
    paths = {"json": out_dir / f"{name}.json", "markdown": out_dir / f"{name}.md",
             "plot": out_dir / f"{name}.png" if png else None}
    md = markdown(rep)
    if png:
        md += f"\n![{name}]({name}.png)\n"
    write_bytes_atomic(paths["json"], (json.dumps(rep, indent=1, default=_json_default) + "\n").encode())
    write_bytes_atomic(paths["markdown"], md.encode())
    if png:
        write_bytes_atomic(paths["plot"], png)
    return paths


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def rebuild(json_path: Path, out_dir: Path | None = None, gate_db: float | None = None) -> dict:
    """Re-render the Markdown and plot of a saved result (after a report change), without re-running;
    with `gate_db`, under that accuracy gate (the JSON is rewritten with it)."""
    json_path = Path(json_path)
    rep = json.loads(json_path.read_text())
    if gate_db is not None:
        regate(rep, gate_db)
    write_outputs(rep, out_dir or json_path.parent, json_path.stem)
    return rep

"""Results: statistics per system, accuracy against diffusers fp32, targets, projection, JSON / Markdown / PNG.

Everything here works on the workers' raw results (kept in the JSON under `raw`), so a report can be
rebuilt from a saved JSON without running anything again (`rebuild(json_path)`).
"""

from __future__ import annotations

import io
import json
import math
import time
from pathlib import Path

import numpy as np

from sd3trt.benchmarks import flops as fl
from sd3trt.benchmarks import systems as sysm

COMPONENTS = ("clip_l", "clip_g", "t5", "vae_encoder", "transformer", "vae_decoder")
TEXT = ("clip_l", "clip_g", "t5")
SCHEMA = 1


def pct(xs) -> dict | None:
    xs = [float(x) for x in xs]
    if not xs:
        return None
    a = np.asarray(xs)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)), "min": float(a.min()),
            "max": float(a.max()), "n": len(xs)}


def denoise_calls(steps: int, strength: float) -> int:
    """Transformer calls of one img2img request (diffusers' get_timesteps)."""
    init = min(steps * strength, steps)
    t_start = int(max(steps - init, 0))
    return steps - t_start


def clean_runs(runs: list[dict], max_other: float) -> tuple[list[dict], bool]:
    """(the runs to take statistics over, whether they are undisturbed): the runs during which other
    processes used at most `max_other` of the machine's CPUs; all runs when none qualifies."""
    clean = [r for r in runs if r.get("other_cpu_frac", 0.0) <= max_other]
    return (clean, True) if clean else (list(runs), False)


def summarize(res: dict, flops_per_call: float | None, peaks: dict, max_other: float = sysm.MAX_OTHER_CPU) -> dict:
    name = res["system"]
    if res.get("status") != "ok":
        return {"status": res.get("status", "failed"), "reason": res.get("reason") or res.get("error")}
    all_runs = res["runs"]
    cold_only = not all_runs and bool(res.get("first_run"))
    if cold_only:  # --system-reps NAME=0: a system too slow for more than its first image
        all_runs = [res["first_run"]]
    runs, undisturbed = clean_runs(all_runs, max_other)
    per_run = [{c: float(sum(r["calls"].get(c, []))) for c in COMPONENTS} for r in runs]
    tr_calls = [t for r in runs for t in r["calls"].get("transformer", [])]
    engine = [sum(pr.values()) for pr in per_run]
    load = [float(r.get("load_s", 0.0)) for r in runs]
    total = [float(r["total_s"]) for r in runs]
    outside = [t - e - l for t, e, l in zip(total, engine, load)]
    s = {
        "status": "ok",
        "e2e_s": pct(total),
        "components_s": {c: pct([pr[c] for pr in per_run]) for c in COMPONENTS if any(pr[c] for pr in per_run)},
        "text_encoders_s": pct([sum(pr[c] for c in TEXT) for pr in per_run]),
        "transformer_call_s": pct(tr_calls),
        "transformer_calls_per_run": len(runs[0]["calls"].get("transformer", [])) if runs else 0,
        "engine_s": pct(engine),
        "load_in_run_s": pct(load),
        "outside_engines_s": pct(outside),
        "outside_engines_frac": pct([o / t for o, t in zip(outside, total)]),
        "cold_start_s": res.get("cold_start_s"),
        "first_image_s": res.get("first_image_s"),
        "load_s": res.get("load_s"),
        "python_start_s": res.get("python_start_s"),
        "peak_rss_mib": res.get("peak_rss_mib"),
        "rss_after_load_mib": res.get("rss_after_load_mib"),
        "loadavg_1m": [r.get("loadavg_1m_before") for r in runs],
        "cold_only": cold_only,
        "runs_total": len(all_runs),
        "runs_used": len(runs),
        "undisturbed": undisturbed,
        "other_cpu_frac": [r.get("other_cpu_frac") for r in all_runs],
    }
    prec = sysm.PRECISION.get(name)
    s["precision"] = prec
    if flops_per_call and s["transformer_call_s"]:
        gf = flops_per_call / s["transformer_call_s"]["p50"] / 1e9
        s["transformer_gflops"] = gf
        pk = peaks.get("peaks", {})
        if prec in pk:
            s["peak_gflops"] = pk[prec]["gflops"]
            s["fraction_of_peak"] = gf / pk[prec]["gflops"]
        if prec != "fp32" and "fp32" in pk:
            s["fraction_of_fp32_peak"] = gf / pk["fp32"]["gflops"]
    return s


def accuracy(results: dict, gate_db: float) -> dict:
    """Every system's first image vs diffusers fp32's (same weights, noise, prompt): PSNR on [0, 1] floats."""
    ref_res = results.get("diffusers-fp32", {})
    if not ref_res.get("image_npy"):
        return {"reference": None, "note": "diffusers-fp32 did not run, so nothing is compared", "systems": {}}
    ref = np.load(ref_res["image_npy"]).astype(np.float64)
    out = {}
    for name, r in results.items():
        if not r.get("image_npy"):
            continue
        img = np.load(r["image_npy"]).astype(np.float64)
        if img.shape != ref.shape:
            out[name] = {"error": f"image shape {img.shape} != reference {ref.shape}", "gated": False}
            continue
        mse = float(((img - ref) ** 2).mean())
        psnr = None if mse == 0 else 10 * math.log10(1.0 / mse)  # None: identical (JSON has no infinity)
        levels = int(np.abs(np.round(img * 255) - np.round(ref * 255)).max())
        out[name] = {"psnr_db": psnr, "identical": mse == 0, "max_abs": float(np.abs(img - ref).max()),
                     "max_levels": levels, "gated": bool(psnr is None or psnr >= gate_db)}
    return {"reference": "diffusers-fp32", "gate_psnr_db": gate_db, "systems": out}


def _ratio(a, b):
    return a / b if a and b else None


def targets(summ: dict, acc: dict) -> list[dict]:
    ok = {n: s for n, s in summ.items() if s.get("status") == "ok"}
    e2e = {n: s["e2e_s"]["p50"] for n, s in ok.items()}
    rss = {n: s["peak_rss_mib"] for n, s in ok.items()}
    gated = {n for n, a in acc.get("systems", {}).items() if a.get("gated")}
    out = []

    def add(target, measured, met):
        out.append({"target": target, "measured": measured, "met": met})

    if "sd3trt-ort-fp32" in e2e and "diffusers-fp32" in e2e:
        r = e2e["diffusers-fp32"] / e2e["sd3trt-ort-fp32"]
        add("sd3trt fp32 at least as fast as diffusers eager fp32 (end to end)",
            f"{e2e['sd3trt-ort-fp32']:.2f} s vs {e2e['diffusers-fp32']:.2f} s: {r:.2f}x", r >= 1.0)
    frac = ok.get("sd3trt-ort-fp32", {}).get("fraction_of_peak")
    if frac is not None and ok["sd3trt-ort-fp32"].get("precision") == "fp32":
        add("sd3trt fp32 transformer at >= 80% of the measured fp32 matmul peak",
            f"{100 * frac:.1f}% ({ok['sd3trt-ort-fp32']['transformer_gflops']:.1f} GFLOP/s)", frac >= 0.8)
    ours = {n: t for n, t in e2e.items() if n.startswith("sd3trt-") and not n.endswith("-lowmem")}
    theirs = {n: t for n, t in e2e.items() if n.startswith("diffusers-")}
    if ours and theirs:
        cand = {n: t for n, t in ours.items() if n in gated}
        d_best = min(theirs, key=theirs.get)
        if cand:
            o_best = min(cand, key=cand.get)
            r = theirs[d_best] / cand[o_best]
            add("sd3trt's fastest accuracy-gated config >= 1.3x faster than diffusers' fastest config",
                f"{o_best} {cand[o_best]:.2f} s vs {d_best} {theirs[d_best]:.2f} s: {r:.2f}x", r >= 1.3)
        else:
            add("sd3trt's fastest accuracy-gated config >= 1.3x faster than diffusers' fastest config",
                "no sd3trt system passed the accuracy gate (or diffusers-fp32 did not run)", None)
    for n in ("sd3trt-ort-fp32", "sd3trt-ort-int8", "sd3trt-ort-int8-vae", "sd3trt-trt"):
        if n in ok and ok[n]["outside_engines_frac"]:
            f = ok[n]["outside_engines_frac"]["p50"]
            add(f"{n}: runtime overhead (time outside engine execution) < 1% of end to end",
                f"{100 * f:.2f}% ({ok[n]['outside_engines_s']['p50'] * 1e3:.0f} ms of {e2e[n]:.2f} s)", f < 0.01)
    if "diffusers-fp32" in rss:
        if "sd3trt-ort-fp32" in rss:
            r = rss["sd3trt-ort-fp32"] / rss["diffusers-fp32"]
            add("peak RSS of sd3trt (default) no higher than diffusers fp32",
                f"{rss['sd3trt-ort-fp32']:.0f} MiB vs {rss['diffusers-fp32']:.0f} MiB: {r:.2f}x", r <= 1.0)
        if "sd3trt-ort-fp32-lowmem" in rss:
            r = rss["sd3trt-ort-fp32-lowmem"] / rss["diffusers-fp32"]
            add("peak RSS of sd3trt low-memory mode at most half of diffusers fp32",
                f"{rss['sd3trt-ort-fp32-lowmem']:.0f} MiB vs {rss['diffusers-fp32']:.0f} MiB: {r:.2f}x", r <= 0.5)
    return out


def project(cfg, spec, spec2, res1: dict, res2: dict, full_depth: dict, target: str) -> dict:
    """Per-layer cost per component from two depths; linear scaling to `full_depth`. A projection, not a
    measurement: it assumes every layer costs the same and nothing else changes with depth."""
    d1, d2 = spec.depth, spec2.depth
    layer_of = {"clip_l": "clip_l", "clip_g": "clip_g", "t5": "t5", "transformer": "transformer"}
    out = {"target": target, "full_depth": full_depth, "depths_measured": [d1, d2], "systems": {}}
    for name, r2 in res2.items():
        r1 = res1.get(name, {})
        if r1.get("status") != "ok" or r2.get("status") != "ok":
            continue
        lim = getattr(cfg, "max_other_cpu", sysm.MAX_OTHER_CPU)
        s1, s2 = summarize(r1, None, {}, lim), summarize(r2, None, {}, lim)
        comps = {}
        delta = 0.0
        for c in COMPONENTS:
            a = (s1["components_s"].get(c) or {}).get("p50")
            b = (s2["components_s"].get(c) or {}).get("p50")
            if a is None or b is None:
                continue
            if c in layer_of:
                k = layer_of[c]
                per_layer = (b - a) / (d2[k] - d1[k])
                full = a + (full_depth[k] - d1[k]) * per_layer
                comps[c] = {"measured_s": [a, b], "per_layer_s": per_layer, "fixed_s": a - d1[k] * per_layer,
                            "full_s": full}
            else:
                full = a
                comps[c] = {"measured_s": [a, b], "full_s": a, "note": "does not scale with depth"}
            delta += full - a
        e2e1 = s1["e2e_s"]["p50"]
        calls = s1["transformer_calls_per_run"]
        tr = comps.get("transformer")
        entry = {"components": comps, "e2e_measured_s": e2e1, "e2e_full_depth_s": e2e1 + delta}
        if tr and calls:
            per_call_full = tr["full_s"] / calls
            entry["transformer_call_full_s"] = per_call_full
            n28 = denoise_calls(28, cfg.strength)
            entry["e2e_full_depth_28_steps_s"] = e2e1 + delta + (n28 - calls) * per_call_full
        out["systems"][name] = entry
    return out


def steps_projection(summ: dict, cfg: dict, steps_to: int = 28) -> dict:
    """End to end at `steps_to` steps from the measured per-call transformer time (a projection)."""
    n_to = denoise_calls(steps_to, cfg["strength"])
    out = {"steps": steps_to, "transformer_calls": n_to, "systems": {}}
    for n, s in summ.items():
        if s.get("status") == "ok" and s["transformer_call_s"]:
            calls = s["transformer_calls_per_run"]
            out["systems"][n] = s["e2e_s"]["p50"] + (n_to - calls) * s["transformer_call_s"]["p50"]
    return out


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
    summ = {n: summarize(r, fcount["total"], peaks, max_other) for n, r in results.items()}
    for n, a in accuracy.get("systems", {}).items():
        if n in summ:
            summ[n]["accuracy"] = a
    notes = []
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
        "targets": targets(summ, accuracy),
        "steps_projection": steps_projection(summ, cfg) if cfg["steps"] != 28 else None,
        "projection": projection,
        "notes": notes,
        "raw": raw,
    }


# ---------------------------------------------------------------------------------------------- Markdown


def _f(x, spec=".2f", suffix=""):
    return "-" if x is None else f"{x:{spec}}{suffix}"


def _p(d, key="p50", spec=".2f"):
    return "-" if not d else f"{d[key]:{spec}}"


def latency_table(rep: dict) -> str:
    systems = rep["systems"]
    base = [n for n in sysm.DIFFUSERS if systems.get(n, {}).get("status") == "ok"]
    head = ["system", "end to end p50 (s)", "p90 (s)", "min (s)", "runs"] + [f"speed-up vs {b}" for b in base] + [
        "text encoders (s)", "VAE enc (s)", "transformer / call p50 (s)", "p90 (s)", "denoise (s)", "VAE dec (s)",
        "cold start (s)"]
    rows = []
    for n, s in systems.items():
        if s.get("status") != "ok":
            continue
        c = s["components_s"]
        den = c.get("transformer")
        runs = f"{s['runs_used']}" + ("" if s["runs_used"] == s["runs_total"] else f" of {s['runs_total']}")
        if s.get("cold_only"):
            runs = "cold run only"
        if not s["undisturbed"]:
            runs += " (disturbed)"
        row = [n, _p(s["e2e_s"]), _p(s["e2e_s"], "p90"), _p(s["e2e_s"], "min"), runs]
        row += [_f(systems[b]["e2e_s"]["p50"] / s["e2e_s"]["p50"], ".2f", "x") for b in base]
        row += [_p(s["text_encoders_s"]), _p(c.get("vae_encoder")), _p(s["transformer_call_s"], "p50", ".3f"),
                _p(s["transformer_call_s"], "p90", ".3f"), _p(den), _p(c.get("vae_decoder")), _f(s["cold_start_s"], ".1f")]
        rows.append(row)
    return _table(head, rows)


def component_table(rep: dict, base: str = "diffusers-fp32") -> str | None:
    """Per component: this system's p50 and the speed-up against `base` (same component)."""
    systems = rep["systems"]
    if systems.get(base, {}).get("status") != "ok":
        return None
    b = systems[base]
    keys = [("clip_l", "CLIP-L"), ("clip_g", "CLIP-G"), ("t5", "T5"), ("vae_encoder", "VAE enc"),
            ("transformer", "transformer (per call)"), ("vae_decoder", "VAE dec")]

    def get(s, k):
        if k == "transformer":
            return (s["transformer_call_s"] or {}).get("p50")
        return (s["components_s"].get(k) or {}).get("p50")

    head = ["system"] + [f"{label} (s)" for _, label in keys] + ["load (s)", "cold start (s)"]
    rows = []
    for n, s in systems.items():
        if s.get("status") != "ok":
            continue
        row = [n]
        for k, _ in keys:
            v, ref = get(s, k), get(b, k)
            row.append("-" if v is None else (f"{v:.3f}" + ("" if n == base or not ref else f" ({ref / v:.2f}x)")))
        row += [_f(s.get("load_s"), ".1f"), _f(s.get("cold_start_s"), ".1f")]
        rows.append(row)
    return _table(head, rows)


def efficiency_table(rep: dict) -> str:
    systems = rep["systems"]
    ref = systems.get("diffusers-fp32", {})
    ref_rss = ref.get("peak_rss_mib") if ref.get("status") == "ok" else None
    head = ["system", "peak RSS (MiB)", "vs diffusers-fp32", "time outside engines", "transformer GFLOP/s",
            "% of peak (precision)", "PSNR vs diffusers-fp32 (dB)", "max diff (levels)", "accuracy gate"]
    rows = []
    for n, s in systems.items():
        if s.get("status") != "ok":
            continue
        a = s.get("accuracy") or {}
        frac = s.get("fraction_of_peak")
        peak = "-" if frac is None else f"{100 * frac:.1f}% ({s['precision']})"
        if s.get("fraction_of_fp32_peak") is not None:
            peak += f"; {100 * s['fraction_of_fp32_peak']:.1f}% of fp32"
        psnr = a.get("psnr_db")
        rows.append([
            n, _f(s["peak_rss_mib"], ".0f"), _f(_ratio(s["peak_rss_mib"], ref_rss), ".2f", "x"),
            _f(100 * s["outside_engines_frac"]["p50"] if s["outside_engines_frac"] else None, ".2f", "%"),
            _f(s.get("transformer_gflops"), ".1f"), peak,
            ("identical" if a.get("identical") else "-") if psnr is None else f"{psnr:.1f}",
            _f(a.get("max_levels"), "d"), "-" if not a else ("pass" if a.get("gated") else "FAIL"),
        ])
    return _table(head, rows)


def _table(head, rows) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(str(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def headline(rep: dict) -> str:
    w = rep["workload"]
    return (f"{rep['model']['spec']['shape']} ({_model_label(rep)}), {w['width']}x{w['height']}, {w['steps']} steps, "
            f"strength {w['strength']}, CFG {'on' if w['cfg'] else 'off'}, {w['num_images']} image(s):\n"
            + latency_table(rep) + "\n\n" + efficiency_table(rep) + "\n")


def _model_label(rep: dict) -> str:
    d = rep["model"].get("depth")
    if not d:
        return rep["config"].get("model_dir") or "external model"
    return f"transformer {d['transformer']} layers, CLIP-L {d['clip_l']}, CLIP-G {d['clip_g']}, T5 {d['t5']}"


def markdown(rep: dict) -> str:
    m, w, cfg = rep["machine"], rep["workload"], rep["config"]
    v = m["versions"]
    out = [f"# sd3trt benchmark: {rep['model']['spec']['shape']}, {w['width']}x{w['height']}, {w['steps']} steps", ""]
    out.append(f"- **Machine** `{m['name']}`: {m['cpu']['model']}, {m['cpu']['usable_cpus']} CPUs, "
               f"{m['memory_gib']} GiB; ISA: {' '.join(m['cpu']['key_flags'])}; GPU: {', '.join(m['gpus']) or 'none'}; "
               f"{rep['threads']} threads for every system; diffusers on {rep['diffusers_device']}")
    out.append("- **Versions** " + ", ".join(f"{k} {val}" for k, val in v.items()))
    out.append(f"- **Model** {_model_label(rep)} (random weights, same for every system; {rep['model']['spec']['shape']})")
    out.append(f"- **Workload** img2img {w['width']}x{w['height']}, {w['steps']} steps at strength {w['strength']} "
               f"({w['transformer_calls']} transformer calls), guidance {w['guidance']} (CFG {'on: batch ' + str(w['transformer_batch']) if w['cfg'] else 'off'}), "
               f"{w['num_images']} image(s), T5 length {cfg['max_sequence_length']}, same prompt, picture and noise "
               f"for every system; {cfg['reps']} measured warm runs after the cold one (+{cfg['warmup']} warm-up); "
               f"prompt cache {'on' if cfg['prompt_cache'] else 'off (prompts encoded every run, as diffusers does)'}")
    out.append(f"- **Created** {rep['created']} in {rep['seconds']:.0f} s")
    for n in rep["notes"]:
        out.append(f"- **Note** {n}")
    out += ["", "## Latency (warm runs; components are time inside the engine / module calls per image)", "",
            latency_table(rep), "",
            "Runs: measured warm runs the statistics use; runs during which other processes used more than "
            f"{100 * cfg.get('max_other_cpu', sysm.MAX_OTHER_CPU):.0f}% of the machine's CPUs (from /proc/stat) are left out and "
            "replaced by extra runs where possible (`of N`: N runs made). "
            "Speed-up columns: the diffusers configuration's end-to-end p50 divided by this system's (above 1: faster). "
            "Cold start: process start to first image (imports, loading, first run), in a fresh process.", "",
            "## Per component (p50 of the time inside each engine / module; in brackets: speed-up vs diffusers-fp32)", "",
            component_table(rep) or "(diffusers-fp32 did not run)", "",
            "Text encoders: summed over the prompt and the negative prompt. Load: building the pipeline / "
            "engines in the fresh process (after imports).", "",
            "## Memory, overhead, hardware efficiency, accuracy", "", efficiency_table(rep), "",
            "Peak RSS: VmHWM (peak resident set) of the system's own process over loading and all runs "
            "(ru_maxrss is in the JSON too, but Linux carries it over from the parent at fork/exec). Time outside engines: end to "
            "end minus time inside the engine/module calls (and, in low-memory mode, engine loading): for sd3trt the "
            "runtime's own overhead (tokenization, numpy scheduler and CFG math, image conversion, copies); for "
            "diffusers its Python pipeline, tokenizers and image processing. Transformer GFLOP/s: analytic FLOPs of "
            f"one call ({rep['transformer_flops_per_call']['total'] / 1e9:.1f} GFLOP, matmuls only, "
            "benchmarks/flops.py) over the p50 call time; % of peak: against this machine's measured matmul peak for "
            "the transformer's precision (below). Accuracy: the decoded image vs diffusers fp32's on the same weights "
            f"and noise; gate: PSNR >= {rep['accuracy'].get('gate_psnr_db', '-')} dB.", ""]
    gone = {n: s for n, s in rep["systems"].items() if s.get("status") != "ok"}
    if gone:
        out += ["## Not run here", ""]
        out += [f"- `{n}` ({s['status']}): {s.get('reason')}" for n, s in gone.items()]
        out.append("")
    if rep["targets"]:
        out += ["## Targets", "", _table(["target", "measured", "met"],
                                         [[t["target"], t["measured"], {True: "yes", False: "**no**", None: "n/a"}[t["met"]]]
                                          for t in rep["targets"]]), ""]
    pk = rep["peaks"]
    if pk.get("peaks"):
        rows = [[p, f"{d['gflops']:.1f}", d["library"]] for p, d in sorted(pk["peaks"].items())]
        libs = "; ".join(f"{k} {v['gflops']:.1f}" for k, v in pk.get("libraries", {}).items() if v.get("gflops"))
        out += ["## Measured matmul peaks (GFLOP/s, best over square sizes 256-4096)", "",
                _table(["precision", "GFLOP/s", "library"], rows), "", f"All libraries: {libs}.", ""]
    sp = rep.get("steps_projection")
    if sp and sp["systems"]:
        out += [f"## Projection to {sp['steps']} steps ({sp['transformer_calls']} transformer calls; not measured)", "",
                "Measured end to end plus the difference in transformer calls times the measured p50 per call.", "",
                _table(["system", f"end to end at {sp['steps']} steps (s, projected)"],
                       [[n, f"{t:.2f}"] for n, t in sp["systems"].items()]), ""]
    pj = rep.get("projection")
    if pj and pj["systems"]:
        fd = pj["full_depth"]
        d1, d2 = pj["depths_measured"]
        out += [f"## Projection to full depth: {pj['target']} (not measured)", "",
                f"Per-layer cost of each component from two measured depths ({_depth(d1)} and {_depth(d2)}), "
                f"scaled linearly to {_depth(fd)}; the VAE does not change. Assumes equal cost per layer and "
                "enough memory for the full model (it would not fit in this machine's RAM in fp32).", ""]
        rows = []
        for n, e in pj["systems"].items():
            c = e["components"]
            rows.append([n, _f(e["e2e_measured_s"]), _f(e["e2e_full_depth_s"]),
                         _f(e.get("e2e_full_depth_28_steps_s")),
                         _f(c.get("transformer", {}).get("per_layer_s"), ".3f"),
                         _f(e.get("transformer_call_full_s"), ".2f"),
                         _f(sum(c[k]["full_s"] for k in TEXT if k in c), ".2f")])
        out += [_table(["system", "measured e2e (s)", "full depth e2e (s)", "full depth, 28 steps (s)",
                        "transformer s / layer / run", "transformer / call, full (s)", "text encoders, full (s)"], rows), ""]
    return "\n".join(out) + "\n"


def _depth(d: dict) -> str:
    return f"transformer {d['transformer']}, CLIP-L {d['clip_l']}, CLIP-G {d['clip_g']}, T5 {d['t5']}"


# ---------------------------------------------------------------------------------------------- plot


def plot_png(rep: dict) -> bytes | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ok = [(n, s) for n, s in rep["systems"].items() if s.get("status") == "ok"]
    if not ok:
        return None
    names = [n for n, _ in ok]
    parts = [("text encoders", lambda s: (s["text_encoders_s"] or {}).get("p50", 0.0)),
             ("VAE encoder", lambda s: (s["components_s"].get("vae_encoder") or {}).get("p50", 0.0)),
             ("transformer", lambda s: (s["components_s"].get("transformer") or {}).get("p50", 0.0)),
             ("VAE decoder", lambda s: (s["components_s"].get("vae_decoder") or {}).get("p50", 0.0))]
    fig, axes = plt.subplots(1, 3, figsize=(17, 0.55 * len(names) + 2.6), gridspec_kw={"width_ratios": [3, 1.3, 1.3]})
    y = np.arange(len(names))
    left = np.zeros(len(names))
    colors = ["#8da0cb", "#66c2a5", "#fc8d62", "#e78ac3", "#bbbbbb"]
    for (label, get), col in zip(parts, colors):
        vals = np.array([get(s) for _, s in ok])
        axes[0].barh(y, vals, left=left, color=col, label=label)
        left += vals
    loads = np.array([(s["load_in_run_s"] or {}).get("p50", 0.0) for _, s in ok])
    if loads.any():
        axes[0].barh(y, loads, left=left, color="#fdd0a2", label="engine loading (low-memory mode)")
        left += loads
    rest = np.array([max(s["e2e_s"]["p50"] - l, 0.0) for (_, s), l in zip(ok, left)])
    axes[0].barh(y, rest, left=left, color=colors[-1], label="outside engines (runtime / pipeline)")
    for i, (_, s) in enumerate(ok):
        axes[0].text(s["e2e_s"]["p50"], i, f" {s['e2e_s']['p50']:.2f} s", va="center", fontsize=8)
    axes[0].set_yticks(y, names)
    axes[0].invert_yaxis()
    axes[0].set_xlabel("end to end per image, p50 (s)")
    axes[0].set_xlim(0, 1.5 * max(s["e2e_s"]["p50"] for _, s in ok))  # room on the right for labels and legend
    axes[0].legend(fontsize=7, loc="lower right")
    rss = [s["peak_rss_mib"] or 0 for _, s in ok]
    axes[1].barh(y, rss, color="#a6d854")
    for i, v in enumerate(rss):
        axes[1].text(v, i, f" {v:.0f}", va="center", fontsize=8)
    axes[1].set_yticks(y, [""] * len(names))
    axes[1].invert_yaxis()
    axes[1].set_xlabel("peak RSS (MiB)")
    frac = [100 * (s.get("fraction_of_peak") or 0) for _, s in ok]
    axes[2].barh(y, frac, color="#ffd92f")
    for i, ((_, s), v) in enumerate(zip(ok, frac)):
        axes[2].text(v, i, f" {v:.0f}% {s.get('precision') or ''}", va="center", fontsize=8)
    axes[2].set_yticks(y, [""] * len(names))
    axes[2].invert_yaxis()
    axes[2].set_xlabel("transformer: % of measured matmul peak")
    w = rep["workload"]
    fig.suptitle(f"SD3 img2img, {rep['model']['spec']['shape']} ({_model_label(rep)}), {w['width']}x{w['height']}, "
                 f"{w['steps']} steps, strength {w['strength']}, CFG {'on' if w['cfg'] else 'off'} - "
                 f"{rep['machine']['name']}, {rep['threads']} threads", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- files


def default_name(cfg, spec) -> str:
    model = spec.key if not cfg.model_dir else "external-" + Path(cfg.model_dir).name
    name = f"{model}_{cfg.width}x{cfg.height}_{cfg.steps}steps"
    if cfg.num_images != 1:
        name += f"_x{cfg.num_images}"
    return name


def write_outputs(rep: dict, out_dir: Path, name: str) -> dict:
    """<name>.json, <name>.md, <name>.png in out_dir, each written atomically (temp file + rename)."""
    from sd3trt.manifest import write_bytes_atomic

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = plot_png(rep)
    rep["files"] = {"json": f"{name}.json", "markdown": f"{name}.md", "plot": f"{name}.png" if png else None}
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


def regate(rep: dict, gate_db: float) -> None:
    """Apply another accuracy gate to a saved result: which systems count as gated, and the targets."""
    for a in rep["accuracy"].get("systems", {}).values():
        if "error" not in a:
            a["gated"] = bool(a.get("psnr_db") is None or a["psnr_db"] >= gate_db)
    rep["accuracy"]["gate_psnr_db"] = gate_db
    rep["config"]["gate_psnr_db"] = gate_db
    rep["targets"] = targets(rep["systems"], rep["accuracy"])


def rebuild(json_path: Path, out_dir: Path | None = None, gate_db: float | None = None) -> dict:
    """Re-render the Markdown and plot of a saved result (after a report change), without re-running;
    with `gate_db`, under that accuracy gate (the JSON is rewritten with it)."""
    json_path = Path(json_path)
    rep = json.loads(json_path.read_text())
    if gate_db is not None:
        regate(rep, gate_db)
    write_outputs(rep, out_dir or json_path.parent, json_path.stem)
    return rep

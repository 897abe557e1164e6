"""Per-system statistics of the workers' raw results: percentiles, undisturbed runs, time per component,
time outside the engines, and the transformer's rate against the machine's matmul peak."""

from __future__ import annotations

import numpy as np

from sd3trt.benchmarks import systems as sysm

COMPONENTS = ("clip_l", "clip_g", "t5", "vae_encoder", "transformer", "vae_decoder")
TEXT = ("clip_l", "clip_g", "t5")


def pct(xs) -> dict | None:
    xs = [float(x) for x in xs]
    if not xs:
        return None
    a = np.asarray(xs)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)), "min": float(a.min()),
            "max": float(a.max()), "n": len(xs)}


def clean_runs(runs: list[dict], max_other: float) -> tuple[list[dict], bool]:
    """(the runs to take statistics over, whether they are undisturbed): the runs during which other
    processes used at most `max_other` of the machine's CPUs; all runs when none qualifies."""
    clean = [r for r in runs if r.get("other_cpu_frac", 0.0) <= max_other]
    return (clean, True) if clean else (list(runs), False)


def summarize(res: dict, flops_per_call: float | None, max_other: float = sysm.MAX_OTHER_CPU) -> dict:
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
    prec = res.get("precision") or sysm.PRECISION.get(name)
    s["precision"] = prec
    if flops_per_call and s["transformer_call_s"]:
        s["transformer_gflops"] = flops_per_call / s["transformer_call_s"]["p50"] / 1e9
    return s


def apply_peaks(summ: dict, peaks: dict) -> list[str]:
    """Each system's transformer rate as a fraction of the machine's peak for its precision (and of the fp32
    peak). Where a transformer ran faster than every kernel the peak measurement timed, that rate is the
    machine's best seen for its precision: the peak is raised to it first, so no fraction exceeds 100%.
    Returns one note per raised peak."""
    pk = peaks.setdefault("peaks", {})
    notes = []
    for prec in sorted({s.get("precision") for s in summ.values() if s.get("transformer_gflops")} - {None}):
        best = max((s for s in summ.values() if s.get("precision") == prec and s.get("transformer_gflops")),
                   key=lambda s: s["transformer_gflops"])
        name = next(n for n, s in summ.items() if s is best)
        old = pk.get(prec, {}).get("gflops")
        if old is not None and best["transformer_gflops"] <= old:
            continue
        pk[prec] = {"gflops": best["transformer_gflops"], "library": f"{name}'s transformer", "kernels_gflops": old}
        notes.append(f"the {prec} peak is {name}'s own transformer rate ({best['transformer_gflops']:.1f} GFLOP/s): "
                     f"faster than every {prec} kernel timed ({'none' if old is None else f'{old:.1f}'} GFLOP/s)")
    for s in summ.values():
        gf, prec = s.get("transformer_gflops"), s.get("precision")
        if not gf:
            continue
        if prec in pk:
            s["peak_gflops"] = pk[prec]["gflops"]
            s["fraction_of_peak"] = gf / pk[prec]["gflops"]
        if prec != "fp32" and "fp32" in pk:
            s["fraction_of_fp32_peak"] = gf / pk["fp32"]["gflops"]
    return notes

"""Projections (not measurements): end to end at another number of steps, and at full model depth from
per-layer costs measured at two depths."""

from __future__ import annotations

from sd3trt.benchmarks import systems as sysm
from sd3trt.benchmarks.stats import COMPONENTS, summarize
from sd3trt.runtime.scheduler import img2img_start_index


def denoise_calls(steps: int, strength: float) -> int:
    """Transformer calls of one img2img request (the scheduler's img2img start index)."""
    return steps - img2img_start_index(steps, strength)


def project(cfg, spec, spec2, res1: dict, res2: dict, full_depth: dict, target: str) -> dict:
    """Per-layer cost per component from two depths; linear scaling to `full_depth`. A projection, not a
    measurement: it assumes every layer costs the same and nothing else changes with depth."""
    d1, d2 = spec.depth, spec2.depth
    out = {"target": target, "full_depth": full_depth, "depths_measured": [d1, d2], "systems": {}}
    for name, r2 in res2.items():
        r1 = res1.get(name, {})
        if r1.get("status") != "ok" or r2.get("status") != "ok":
            continue
        lim = getattr(cfg, "max_other_cpu", sysm.MAX_OTHER_CPU)
        s1, s2 = summarize(r1, None, lim), summarize(r2, None, lim)
        comps = {}
        delta = 0.0
        for c in COMPONENTS:
            a = (s1["components_s"].get(c) or {}).get("p50")
            b = (s2["components_s"].get(c) or {}).get("p50")
            if a is None or b is None:
                continue
            if c in full_depth:  # the depth-scaled components
                per_layer = (b - a) / (d2[c] - d1[c])
                full = a + (full_depth[c] - d1[c]) * per_layer
                comps[c] = {"measured_s": [a, b], "per_layer_s": per_layer, "fixed_s": a - d1[c] * per_layer,
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

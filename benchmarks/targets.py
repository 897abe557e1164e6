"""Verdicts on a benchmark: every system's image against the diffusers reference's (the accuracy gate), and the
project's speed and memory targets, met or not."""

from __future__ import annotations

import math

import numpy as np

from sd3trt.benchmarks import systems as sysm

# optimum-intel's 8-bit mode is compared on its own (a different accuracy trade-off, not gated here).
EIGHT_BIT_PEER = "optimum-intel-openvino-int8"
# The accuracy reference: the first of these that ran (diffusers-fp32 may not fit a machine's memory).
REFERENCES = ("diffusers-fp32", "diffusers-bf16")


def reference(results: dict) -> str | None:
    """The accuracy reference of a run: the first of REFERENCES that left an image; None when none did."""
    return next((n for n in REFERENCES if results.get(n, {}).get("image_npy")), None)


def is_peer(name: str) -> bool:
    """A system the speed targets compare against (systems.PEERS but the 8-bit one)."""
    return name in sysm.PEERS and name != EIGHT_BIT_PEER


def where_time_goes(s: dict) -> str:
    """Where a system's end-to-end time goes: seconds and share per component, the transformer's % of peak."""
    e2e = s["e2e_s"]["p50"]
    parts = sorted(((c, v["p50"]) for c, v in s.get("components_s", {}).items()), key=lambda cv: -cv[1])
    text = ", ".join(f"{c} {t:.1f} s ({100 * t / e2e:.0f}%)" for c, t in parts)
    if s.get("fraction_of_peak") is not None:
        text += f"; transformer at {100 * s['fraction_of_peak']:.0f}% of the {s['precision']} peak"
    return "where its time goes: " + text


def accuracy(results: dict, gate_db: float) -> dict:
    """Every system's first image vs the reference's (same weights, noise, prompt): PSNR on [0, 1] floats."""
    base = reference(results)
    if base is None:
        return {"reference": None, "note": f"neither {' nor '.join(REFERENCES)} ran, so nothing is compared",
                "systems": {}}
    ref = np.load(results[base]["image_npy"]).astype(np.float64)
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
    acc = {"reference": base, "gate_psnr_db": gate_db, "systems": out}
    before = REFERENCES[:REFERENCES.index(base)]
    if before:
        said = {"skipped": "was skipped", "timeout": "timed out"}
        why = "; ".join(f"{n} {said.get(results[n]['status'], results[n]['status'])}: "
                        f"{results[n].get('reason') or results[n].get('error')}" if n in results
                        else f"{n} was not in the run" for n in before)
        acc["note"] = f"{base} is the accuracy reference, as {why}"
    return acc


def targets(summ: dict, acc: dict, projection: dict | None = None) -> list[dict]:
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
    theirs = {n: t for n, t in e2e.items() if is_peer(n)}
    cand = {n: t for n, t in ours.items() if n in gated}
    if ours and theirs:
        what = "sd3trt's fastest accuracy-gated config >= 1.3x faster than the fastest of diffusers and optimum-intel"
        if cand:
            o_best, d_best = min(cand, key=cand.get), min(theirs, key=theirs.get)
            r = theirs[d_best] / cand[o_best]
            add(what, f"{o_best} {cand[o_best]:.2f} s vs {d_best} {theirs[d_best]:.2f} s: {r:.2f}x"
                + ("" if r >= 1.3 else f"; {where_time_goes(ok[o_best])}"), r >= 1.3)
        else:
            add(what, "no sd3trt system passed the accuracy gate (or no diffusers reference ran)", None)
    if cand and EIGHT_BIT_PEER in e2e:
        o_best = min(cand, key=cand.get)
        r = e2e[EIGHT_BIT_PEER] / cand[o_best]
        add(f"sd3trt's fastest accuracy-gated config vs {EIGHT_BIT_PEER} (its own 8-bit mode; aim >= 1.0x)",
            f"{o_best} {cand[o_best]:.2f} s vs {e2e[EIGHT_BIT_PEER]:.2f} s: {r:.2f}x"
            + ("" if r >= 1.0 else f"; {where_time_goes(ok[o_best])}"), r >= 1.0)
    pj = (projection or {}).get("systems") or {}
    p_ours = {n: p["e2e_full_depth_s"] for n, p in pj.items() if n in cand}
    p_theirs = {n: p["e2e_full_depth_s"] for n, p in pj.items() if is_peer(n)}
    if p_ours and p_theirs:
        o_best, d_best = min(p_ours, key=p_ours.get), min(p_theirs, key=p_theirs.get)
        r = p_theirs[d_best] / p_ours[o_best]
        add(f"the same at full depth ({projection['target']}, projected): >= 1.5x",
            f"{o_best} {p_ours[o_best]:.1f} s vs {d_best} {p_theirs[d_best]:.1f} s: {r:.2f}x", r >= 1.5)
    for n, s in ok.items():
        if n.startswith("sd3trt-") and not n.endswith("-lowmem") and s["outside_engines_frac"]:
            f = s["outside_engines_frac"]["p50"]
            add(f"{n}: runtime overhead (time outside engine execution) < 1% of end to end",
                f"{100 * f:.2f}% ({s['outside_engines_s']['p50'] * 1e3:.0f} ms of {e2e[n]:.2f} s)", f < 0.01)
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


def regate(rep: dict, gate_db: float) -> None:
    """Apply another accuracy gate to a saved result: which systems count as gated, and the targets."""
    for a in rep["accuracy"].get("systems", {}).values():
        if "error" not in a:
            a["gated"] = bool(a.get("psnr_db") is None or a["psnr_db"] >= gate_db)
    rep["accuracy"]["gate_psnr_db"] = gate_db
    rep["config"]["gate_psnr_db"] = gate_db
    rep["targets"] = targets(rep["systems"], rep["accuracy"], rep.get("projection"))

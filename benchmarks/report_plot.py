"""The benchmark report's plot (PNG): end to end per image by component, peak RSS, fraction of the matmul peak."""

from __future__ import annotations

import io

import numpy as np

from sd3trt.benchmarks.report_tables import model_label


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
    fig.suptitle(f"SD3 img2img, {rep['model']['spec']['shape']} ({model_label(rep)}), {w['width']}x{w['height']}, "
                 f"{w['steps']} steps, strength {w['strength']}, CFG {'on' if w['cfg'] else 'off'} - "
                 f"{rep['machine']['name']}, {rep['threads']} threads", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()

"""The benchmark report in Markdown: latency, per-component, memory/efficiency/accuracy tables, targets,
peaks and projections."""

from __future__ import annotations

from sd3trt.benchmarks import systems as sysm
from sd3trt.benchmarks.stats import TEXT


def _ratio(a, b):
    return a / b if a and b else None


def _f(x, spec=".2f", suffix=""):
    return "-" if x is None else f"{x:{spec}}{suffix}"


def _p(d, key="p50", spec=".2f"):
    return "-" if not d else f"{d[key]:{spec}}"


def latency_table(rep: dict) -> str:
    systems = rep["systems"]
    base = [n for n in sysm.PEERS if systems.get(n, {}).get("status") == "ok"]
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


def reference(rep: dict) -> str:
    """The diffusers system the tables compare against: the accuracy reference (results before it: fp32)."""
    return rep["accuracy"].get("reference") or "diffusers-fp32"


def component_table(rep: dict) -> str | None:
    """Per component: this system's p50 and the speed-up against the reference (same component)."""
    systems = rep["systems"]
    base = reference(rep)
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
    base = reference(rep)
    ref = systems.get(base, {})
    ref_rss = ref.get("peak_rss_mib") if ref.get("status") == "ok" else None
    head = ["system", "peak RSS (MiB)", f"vs {base}", "time outside engines", "transformer GFLOP/s",
            "% of peak (precision)", f"PSNR vs {base} (dB)", "max diff (levels)", "accuracy gate"]
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
    return (f"{rep['model']['spec']['shape']} ({model_label(rep)}), {w['width']}x{w['height']}, {w['steps']} steps, "
            f"strength {w['strength']}, CFG {'on' if w['cfg'] else 'off'}, {w['num_images']} image(s):\n"
            + latency_table(rep) + "\n\n" + efficiency_table(rep) + "\n")


def model_label(rep: dict) -> str:
    d = rep["model"].get("depth")
    if not d:
        return rep["config"].get("model_dir") or "external model"
    return f"transformer {d['transformer']} layers, CLIP-L {d['clip_l']}, CLIP-G {d['clip_g']}, T5 {d['t5']}"


def markdown(rep: dict) -> str:
    m, w, cfg = rep["machine"], rep["workload"], rep["config"]
    v, base = m["versions"], reference(rep)
    out = [f"# sd3trt benchmark: {rep['model']['spec']['shape']}, {w['width']}x{w['height']}, {w['steps']} steps", ""]
    out.append(f"- **Machine** `{m['name']}`: {m['cpu']['model']}, {m['cpu']['usable_cpus']} CPUs, "
               f"{m['memory_gib']} GiB; ISA: {' '.join(m['cpu']['key_flags'])}; GPU: {', '.join(m['gpus']) or 'none'}; "
               f"{rep['threads']} threads for every system; diffusers on {rep['diffusers_device']}")
    out.append("- **Versions** " + ", ".join(f"{k} {val}" for k, val in v.items()))
    out.append(f"- **Model** {model_label(rep)} (random weights, same for every system; {rep['model']['spec']['shape']})")
    out.append(f"- **Workload** img2img {w['width']}x{w['height']}, {w['steps']} steps at strength {w['strength']} "
               f"({w['transformer_calls']} transformer calls), guidance {w['guidance']} (CFG {'on: batch ' + str(w['transformer_batch']) if w['cfg'] else 'off'}), "
               f"{w['num_images']} image(s), T5 length {cfg['max_sequence_length']}, same prompt, picture and noise "
               f"for every system; {cfg['reps']} measured warm runs after the cold one (+{cfg['warmup']} warm-up); "
               f"prompt cache {'on' if cfg['prompt_cache'] else 'off (prompts encoded every run, as diffusers does)'}")
    acc = rep["accuracy"]
    out.append(f"- **Accuracy reference** {acc.get('note') or acc.get('reference')}")
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
            f"## Per component (p50 of the time inside each engine / module; in brackets: speed-up vs {base})", "",
            component_table(rep) or f"({base} did not run)", "",
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
            f"the transformer's precision (below). Accuracy: the decoded image vs {base}'s on the same weights "
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
        out += ["## Measured matmul peaks (GFLOP/s, best over the model's layer shapes and squares 512-3072, warm)", "",
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

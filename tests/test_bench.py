"""The benchmark suite: quick mode end to end on the tiny model (well-formed results, not timings), the
analytic FLOP count against PyTorch's own count, and the CLI hook's import weight."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sd3trt.benchmarks.systems import DEFAULT_SYSTEMS


@pytest.fixture(scope="module")
def quick_result(tiny_sd3, tmp_path_factory):
    from sd3trt.benchmarks.cli import main

    model, bundle = tiny_sd3
    work = tmp_path_factory.mktemp("bench")
    # --quick, made lighter still: 2 steps, 1 measured run, a 1-second peak sweep (well-formedness only).
    # No --out: results go under the working directory, never into the installed package.
    cwd = os.getcwd()
    os.chdir(work)
    try:
        rc = main(["--quick", "--model-dir", str(model), "--bundle", str(bundle), "--machine", "testbox", "--name",
                   "quick", "--steps", "2", "--reps", "1", "--peak-budget", "1", "--cache-dir", str(work / "cache")])
    finally:
        os.chdir(cwd)
    assert rc == 0
    out = work / "sd3trt-bench" / "testbox"
    return out, json.loads((out / "quick.json").read_text())


def test_bench_help_is_written_for_users():
    r = subprocess.run([sys.executable, "-m", "sd3trt.cli", "bench", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "img2img workload" in r.stdout
    assert "core/cli.py" not in r.stdout and "add_bench_command" not in r.stdout
    assert "./sd3trt-bench/<machine>/" in r.stdout


def test_quick_json_is_well_formed(quick_result):
    _, rep = quick_result
    for key in ("schema", "machine", "threads", "config", "model", "workload", "transformer_flops_per_call", "peaks",
                "systems", "accuracy", "targets", "notes", "raw"):
        assert key in rep, key
    m = rep["machine"]
    assert m["cpu"]["model"] and m["cpu"]["logical_cpus"] >= 1 and isinstance(m["cpu"]["flags"], list)
    for lib in ("python", "numpy", "torch", "diffusers", "onnxruntime"):
        assert lib in m["versions"], lib
    assert rep["peaks"]["peaks"]["fp32"]["gflops"] > 0
    assert rep["transformer_flops_per_call"]["total"] > 0
    assert rep["workload"]["transformer_calls"] == 2  # 2 steps at strength 0.6: int(2 - 1.2) = 0 skipped


def test_every_system_ran_or_says_why_not(quick_result):
    _, rep = quick_result
    systems = rep["systems"]
    assert set(DEFAULT_SYSTEMS) <= set(systems)
    for name, s in systems.items():
        assert s["status"] in ("ok", "skipped"), (name, s)
        if s["status"] == "skipped":
            assert len(s["reason"]) > 20, name
            continue
        assert s["e2e_s"]["p50"] > 0 and s["e2e_s"]["n"] == 1
        assert s["cold_start_s"] >= s["e2e_s"]["min"] * 0.5
        assert s["peak_rss_mib"] > 0
        assert s["transformer_call_s"]["n"] == rep["workload"]["transformer_calls"]
        assert set(s["components_s"]) >= {"clip_l", "clip_g", "t5", "vae_encoder", "transformer", "vae_decoder"}
        assert 0 <= s["outside_engines_frac"]["p50"] < 1
        assert s["transformer_gflops"] > 0
    for name in ("diffusers-fp32", "sd3trt-ort-fp32", "sd3trt-ort-fp32-lowmem", "sd3trt-openvino-fp32"):
        assert systems[name]["status"] == "ok", name
    for name, s in systems.items():  # peaks are the best seen: no system runs above its precision's
        assert s.get("fraction_of_peak", 0) <= 1.0, (name, s.get("fraction_of_peak"))
    # Same weights, prompt and injected noise: the fp32 systems agree with diffusers fp32 (plumbing check).
    acc = rep["accuracy"]["systems"]
    assert acc["diffusers-fp32"]["identical"]
    assert acc["sd3trt-ort-fp32"]["max_levels"] <= 1 and acc["sd3trt-ort-fp32"]["gated"]
    assert acc["sd3trt-ort-fp32-lowmem"]["max_levels"] <= 1
    assert acc["sd3trt-openvino-fp32"]["max_levels"] <= 1 and acc["sd3trt-openvino-fp32"]["gated"]
    assert rep["raw"]["sd3trt-openvino-fp32"]["torch_loaded"] is False
    # The sd3trt workers ran without torch (so their RSS is the runtime's own).
    assert rep["raw"]["sd3trt-ort-fp32"]["torch_loaded"] is False
    assert rep["raw"]["diffusers-fp32"]["torch_loaded"] is True


def test_a_system_faster_than_every_kernel_sets_the_peak():
    from sd3trt.benchmarks.stats import apply_peaks

    peaks = {"peaks": {"fp32": {"gflops": 100.0, "library": "numpy"}, "bf16": {"gflops": 150.0, "library": "x"}}}
    summ = {"a-bf16": {"precision": "bf16", "transformer_gflops": 300.0, "fraction_of_peak": 2.0},
            "b-bf16": {"precision": "bf16", "transformer_gflops": 120.0, "fraction_of_peak": 0.8},
            "c-int8": {"precision": "int8", "transformer_gflops": 90.0, "fraction_of_fp32_peak": 0.9},
            "d-fp32": {"precision": "fp32", "transformer_gflops": 80.0, "fraction_of_peak": 0.8}}
    notes = apply_peaks(summ, peaks)
    assert peaks["peaks"]["bf16"] == {"gflops": 300.0, "library": "a-bf16's transformer", "kernels_gflops": 150.0}
    assert summ["a-bf16"]["fraction_of_peak"] == 1.0 and summ["b-bf16"]["fraction_of_peak"] == 0.4
    assert peaks["peaks"]["int8"]["gflops"] == 90.0 and summ["c-int8"]["fraction_of_peak"] == 1.0  # none timed
    assert peaks["peaks"]["fp32"]["gflops"] == 100.0 and summ["d-fp32"]["fraction_of_peak"] == 0.8  # below: kept
    assert len(notes) == 2 and "faster than every bf16 kernel timed (150.0 GFLOP/s)" in notes[0]


def test_markdown_table_and_plot(quick_result):
    out, rep = quick_result
    md = (out / "quick.md").read_text()
    assert "| system | end to end p50 (s) |" in md and "speed-up vs diffusers-fp32" in md
    assert "| system | peak RSS (MiB) |" in md
    for name, s in rep["systems"].items():
        assert name in md
        if s["status"] == "skipped":
            assert s["reason"][:40] in md
    assert "## Targets" in md
    if rep["files"]["plot"]:
        assert (out / "quick.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temp files


def test_rebuild_applies_another_gate(quick_result, tmp_path):
    from sd3trt.benchmarks.report import rebuild

    out, rep = quick_result
    src = tmp_path / "quick.json"
    src.write_text(json.dumps(rep))
    # sd3trt fp32 matches diffusers within a level (PSNR far above any gate); an impossible gate fails it.
    strict = rebuild(src, tmp_path, gate_db=1000.0)
    assert strict["accuracy"]["gate_psnr_db"] == 1000.0
    assert strict["accuracy"]["systems"]["diffusers-fp32"]["gated"]  # identical: always within the gate
    assert not strict["accuracy"]["systems"]["sd3trt-ort-fp32"]["gated"]
    speed = [t for t in strict["targets"] if "accuracy-gated" in t["target"]]
    assert speed and speed[0]["met"] is None and "no sd3trt system passed" in speed[0]["measured"]
    assert "gate: PSNR >= 1000.0 dB" in (tmp_path / "quick.md").read_text()
    again = rebuild(src, tmp_path, gate_db=20.0)
    assert again["accuracy"]["systems"]["sd3trt-ort-fp32"]["gated"]


@pytest.mark.parametrize("sd35", [False, True], ids=["sd3", "sd35-dual-attention"])
def test_flop_count_matches_pytorch(sd35):
    import torch
    from diffusers import SD3Transformer2DModel
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from sd3trt.benchmarks.flops import transformer_call_flops

    torch.manual_seed(0)
    m = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=3, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=96, caption_projection_dim=32, pooled_projection_dim=64,
        pos_embed_max_size=32, qk_norm="rms_norm" if sd35 else None, dual_attention_layers=(0,) if sd35 else (),
    ).eval()
    args = dict(hidden_states=torch.randn(2, 16, 16, 24), encoder_hidden_states=torch.randn(2, 90, 96),
                pooled_projections=torch.randn(2, 64), timestep=torch.tensor([1.0, 2.0]))
    # The math SDPA backend decomposes attention into bmm, which the counter sees.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        m(**args)
    assert transformer_call_flops(dict(m.config), 16, 24, 90, 2)["total"] == fc.get_total_flops()


def test_cli_hook_is_light_and_registers_bench():
    code = ("import argparse, sys; from sd3trt.benchmarks.cli import add_bench_command; "
            "p = argparse.ArgumentParser(); s = p.add_subparsers(dest='c'); add_bench_command(s); "
            "a = p.parse_args(['bench', '--quick', '--systems', 'sd3trt-ort-fp32']); "
            "heavy = [m for m in ('torch', 'diffusers', 'onnxruntime', 'onnx', 'transformers') if m in sys.modules]; "
            "print(a.c, a.quick, heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "bench True []"


def test_batching_probe_times_every_engine(tiny_sd3):
    r = subprocess.run([sys.executable, "-m", "sd3trt.benchmarks.batching", "--bundle", str(tiny_sd3[1]), "--size",
                        "64", "--requests", "2", "--reps", "1"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [l.split()[0] for l in r.stdout.splitlines() if "speed-up" in l]
    assert rows == ["transformer", "vae_encoder", "vae_decoder"], r.stdout


def test_targets_against_the_peers_and_at_full_depth():
    from sd3trt.benchmarks.targets import targets

    def sys_(e2e, prec=None, frac=None):
        return {"status": "ok", "e2e_s": {"p50": e2e}, "peak_rss_mib": 1000.0, "precision": prec,
                "fraction_of_peak": frac, "outside_engines_frac": None,
                "components_s": {"transformer": {"p50": e2e * 0.6}, "vae_decoder": {"p50": e2e * 0.3}}}

    summ = {"diffusers-fp32": sys_(100.0), "diffusers-bf16": sys_(40.0), "optimum-intel-openvino": sys_(30.0),
            "optimum-intel-openvino-int8": sys_(20.0), "sd3trt-openvino-int8": sys_(25.0, "int8", 0.5),
            "sd3trt-ort-fp32": sys_(90.0)}
    acc = {"systems": {"sd3trt-openvino-int8": {"gated": True}, "sd3trt-ort-fp32": {"gated": True}}}
    projection = {"target": "sd3-medium", "systems": {"sd3trt-openvino-int8": {"e2e_full_depth_s": 100.0},
                                                      "optimum-intel-openvino": {"e2e_full_depth_s": 160.0},
                                                      "diffusers-bf16": {"e2e_full_depth_s": 200.0}}}
    by = {t["target"].split(" (")[0][:60]: t for t in targets(summ, acc, projection)}
    fastest = next(t for t in by.values() if t["target"].startswith("sd3trt's fastest accuracy-gated config >= 1.3x"))
    assert "vs optimum-intel-openvino 30.00 s: 1.20x" in fastest["measured"] and fastest["met"] is False
    assert "where its time goes: transformer 15.0 s (60%), vae_decoder 7.5 s (30%)" in fastest["measured"]
    assert "50% of the int8 peak" in fastest["measured"]
    eight = next(t for t in by.values() if "optimum-intel-openvino-int8" in t["target"])
    assert eight["measured"].startswith("sd3trt-openvino-int8 25.00 s vs 20.00 s: 0.80x") and eight["met"] is False
    full = next(t for t in by.values() if "full depth" in t["target"])
    assert "vs optimum-intel-openvino 160.0 s: 1.60x" in full["measured"] and full["met"] is True


def test_the_bench_gates_again_when_a_graph_changed(tiny_sd3, tmp_path, monkeypatch):
    """A verdict recorded for a graph's old file (before a re-quantization) does not count: --quantize gates again."""
    import shutil

    from sd3trt.benchmarks import run
    from sd3trt.engines import cpu_gate
    from sd3trt.manifest import CPU_GATES, load_bundle, set_entry
    from sd3trt.runtime import ov_runner
    from sd3trt.runtime.cpu_precision import GATE_KEY, graph_key

    root = tmp_path / "bundle"
    shutil.copytree(tiny_sd3[1], root)
    gated = []
    monkeypatch.setattr(ov_runner, "cpu_has_bf16", lambda: True)
    monkeypatch.setattr(cpu_gate, "gate_bf16", lambda bundle, settings, threads, log: gated.append(bundle))
    cfg = run.BenchConfig(**{**run.QUICK, "quantize": True, "systems": ("sd3trt-openvino-bf16",)})
    graphs = cpu_gate.graphs_of(load_bundle(root))
    shas = {k: graph_key(load_bundle(root), c, p)[1] for k, (c, p) in graphs.items()}
    record = {"graphs": {k: {"sha256": sha, "passed": True} for k, sha in shas.items()}}
    set_entry(root, CPU_GATES, GATE_KEY, record)
    run._maybe_gate(cfg, root)
    assert gated == []  # every graph has a verdict on its present file
    record["graphs"]["vae_decoder"]["sha256"] = "0" * 64  # measured on a file since replaced
    set_entry(root, CPU_GATES, GATE_KEY, record)
    run._maybe_gate(cfg, root)
    assert gated == [root]

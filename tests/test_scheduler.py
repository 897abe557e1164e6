"""sd3trt.runtime.scheduler against diffusers' FlowMatchEulerDiscreteScheduler and the SD3 img2img pipeline.

Measured max deviation over the whole seeded grid below (diffusers 0.42.1, torch 2.13 CPU, numpy 2.4):
exactly 0.0 for timesteps, sigmas, the img2img slice, scale_noise and 1-100-step Euler loops, in float32
and in the float16/float64 mixes — the numpy code repeats diffusers' operation order and dtypes, so the
results are bit-identical. The tolerance is therefore 0 (TOL): any deviation means an op order or dtype
drifted from diffusers, which is worth a look rather than a looser bound.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from sd3trt.errors import Sd3trtError
from sd3trt.runtime import scheduler as sch

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402
from diffusers.pipelines.stable_diffusion_3 import pipeline_stable_diffusion_3_img2img as sd3_img2img  # noqa: E402

TOL = 0.0  # measured: 0.0 everywhere (bit-identical); see the module docstring


def maxdev(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def assert_same(ours, ref, what: str) -> None:
    ref = ref.numpy() if isinstance(ref, torch.Tensor) else np.asarray(ref)
    assert np.asarray(ours).dtype == ref.dtype, (what, np.asarray(ours).dtype, ref.dtype)
    d = maxdev(ours, ref)
    assert d <= TOL, f"{what}: max deviation {d} > {TOL}"


def reference(**kw) -> tuple[FlowMatchEulerDiscreteScheduler, sch.SchedulerConfig]:
    """A diffusers scheduler and our config read from its scheduler_config.json text."""
    ref = FlowMatchEulerDiscreteScheduler(**kw)
    return ref, sch.SchedulerConfig.from_dict(json.loads(ref.to_json_string()))


def random_case(rng: np.random.Generator) -> dict:
    """One randomized scheduler setup: config kwargs, steps, optional custom sigmas, mu, strength."""
    kw: dict = {"shift": float(rng.choice([1.0, 3.0, round(float(rng.uniform(0.3, 8.0)), 4)]))}
    if rng.random() < 0.3:
        kw["use_dynamic_shifting"] = True
        kw["time_shift_type"] = str(rng.choice(["exponential", "linear"]))
    if rng.random() < 0.25:
        kw["shift_terminal"] = float(rng.uniform(0.01, 0.5))
    if rng.random() < 0.2:
        kw["invert_sigmas"] = True
    r = rng.random()
    if r < 0.15:
        kw["use_karras_sigmas"] = True
    elif r < 0.3:
        kw["use_exponential_sigmas"] = True
    if rng.random() < 0.15:
        kw["num_train_timesteps"] = int(rng.integers(10, 2000))
    steps = int(rng.integers(1, 101))
    sigmas = None
    if rng.random() < 0.25:
        low = 0.01 if kw.get("use_exponential_sigmas") else 0.0
        sigmas = np.sort(rng.uniform(low, 1.0, steps))[::-1].tolist()
        if rng.random() < 0.5:
            sigmas[0] = 1.0
    mu = None
    if kw.get("use_dynamic_shifting"):
        mu = float(rng.uniform(0.3, 1.5))
    elif rng.random() < 0.1:
        mu = 0.7  # diffusers ignores mu without dynamic shifting; so must we
    strength = float(rng.choice([1.0, 0.6, 1e-3, rng.uniform(0.0, 1.0), rng.uniform(0.9, 1.0)]))
    return dict(kw=kw, steps=steps, sigmas=sigmas, mu=mu, strength=strength)


def ref_schedule(ref, steps, sigmas, mu):
    """The pipeline's path: retrieve_timesteps (passes steps only without custom sigmas)."""
    extra = {"mu": mu} if mu is not None else {}
    return sd3_img2img.retrieve_timesteps(ref, None if sigmas else steps, "cpu", sigmas=sigmas, **extra)


def ref_get_timesteps(ref, n, strength):
    """The pipeline's own get_timesteps (it also calls set_begin_index on the scheduler)."""
    return sd3_img2img.StableDiffusion3Img2ImgPipeline.get_timesteps(SimpleNamespace(scheduler=ref), n, strength, "cpu")


# --------------------------------------------------------------------------- parity


def test_schedule_and_img2img_slice_match_diffusers():
    rng = np.random.default_rng(1234)
    seen = set()
    for _ in range(400):
        c = random_case(rng)
        ref, cfg = reference(**c["kw"])
        with np.errstate(invalid="ignore", divide="ignore"):
            ts_ref, n_ref = ref_schedule(ref, c["steps"], c["sigmas"], c["mu"])
        if not np.all(np.isfinite(ref.sigmas.numpy())):
            # shift_terminal on a schedule ending at sigma 1 (e.g. one step): diffusers divides 0 by 0
            with pytest.raises(Sd3trtError, match="last sigma is 1"):
                sch.set_timesteps(cfg, None if c["sigmas"] else c["steps"], sigmas=c["sigmas"], mu=c["mu"])
            seen.add("nan_refused")
            continue
        ts, sig = sch.set_timesteps(cfg, None if c["sigmas"] else c["steps"], sigmas=c["sigmas"], mu=c["mu"])
        assert_same(ts, ts_ref, f"timesteps {c}")
        assert_same(sig, ref.sigmas, f"sigmas {c}")
        assert len(ts) == n_ref and len(sig) == n_ref + 1

        tsr, left = ref_get_timesteps(ref, n_ref, c["strength"])
        if left == 0:  # diffusers would go on with an empty schedule; we refuse (tested below)
            with pytest.raises(Sd3trtError, match="no denoising step"):
                sch.img2img_timesteps(ts, sig, len(ts), c["strength"])
            continue
        assert sch.img2img_start_index(n_ref, c["strength"]) == ref.begin_index
        ts_run, sig_run = sch.img2img_timesteps(ts, sig, len(ts), c["strength"])
        assert_same(ts_run, tsr, f"img2img timesteps {c}")
        assert len(sig_run) == left + 1
        assert_same(sig_run, ref.sigmas[ref.begin_index:], f"img2img sigmas {c}")
        seen.update(k for k, v in c["kw"].items() if v not in (False, None))
        seen.add("custom_sigmas" if c["sigmas"] else "steps")
    # the grid really covered every flag
    assert seen >= {"shift", "use_dynamic_shifting", "time_shift_type", "shift_terminal", "invert_sigmas",
                    "use_karras_sigmas", "use_exponential_sigmas", "num_train_timesteps", "custom_sigmas", "steps"}


def test_scale_noise_and_euler_loop_match_diffusers():
    rng = np.random.default_rng(99)
    shape = (2, 4, 6, 8)
    for case in range(60):
        c = random_case(rng)
        ref, cfg = reference(**c["kw"])
        with np.errstate(invalid="ignore", divide="ignore"):
            _, n_ref = ref_schedule(ref, c["steps"], c["sigmas"], c["mu"])
        tsr, left = ref_get_timesteps(ref, n_ref, c["strength"])
        if left == 0 or not np.all(np.isfinite(ref.sigmas.numpy())):
            continue
        ts, sig = sch.set_timesteps(cfg, None if c["sigmas"] else c["steps"], sigmas=c["sigmas"], mu=c["mu"])
        ts_run, sig_run = sch.img2img_timesteps(ts, sig, len(ts), c["strength"])

        init = rng.standard_normal(shape).astype(np.float32) * 2
        noise = rng.standard_normal(shape).astype(np.float32)
        # prepare_latents: scale_noise with timesteps[:1] repeated over the batch (uses the begin index)
        lat_ref = ref.scale_noise(torch.from_numpy(init), tsr[:1].repeat(shape[0]), torch.from_numpy(noise))
        lat = sch.scale_noise(init, sig_run[0], noise)
        assert_same(lat, lat_ref, f"scale_noise {c}")

        for i, t in enumerate(tsr):
            assert np.float32(ts_run[i]) == np.float32(t.item())
            out = rng.standard_normal(shape).astype(np.float32)
            lat_ref = ref.step(torch.from_numpy(out), t, lat_ref, return_dict=False)[0]
            lat = sch.euler_step(lat, out, sig_run[i], sig_run[i + 1])
        assert_same(lat, lat_ref, f"euler loop ({left} steps) {c}")


@pytest.mark.parametrize("sample_dtype,out_dtype", [
    (np.float16, np.float16), (np.float32, np.float16), (np.float16, np.float32),
    (np.float64, np.float64), (np.float32, np.float64), (np.float64, np.float32),
])
def test_dtype_behaviour_matches_diffusers(sample_dtype, out_dtype):
    """step upcasts the sample to float32 and returns the model output's dtype; dt is cast like torch does."""
    rng = np.random.default_rng(7)
    ref, cfg = reference(shift=3.0)
    ref.set_timesteps(20)
    ref.set_begin_index(5)
    _, sig = sch.set_timesteps(cfg, 20)
    x = (rng.standard_normal((2, 4, 16, 16)) * 3).astype(sample_dtype)
    z = rng.standard_normal(x.shape).astype(sample_dtype)
    assert_same(sch.scale_noise(x, sig[5], z), ref.scale_noise(torch.from_numpy(x), ref.timesteps[5:6].repeat(2),
                                                                torch.from_numpy(z)), "scale_noise")
    lat_ref, lat = torch.from_numpy(x.copy()), x.copy()
    for i in range(5, 20):
        out = (rng.standard_normal(x.shape) * 2).astype(out_dtype)
        lat_ref = ref.step(torch.from_numpy(out), ref.timesteps[i], lat_ref, return_dict=False)[0]
        lat = sch.euler_step(lat, out, sig[i], sig[i + 1])
    assert_same(lat, lat_ref, "euler loop")


def test_scale_noise_per_batch_sigma():
    rng = np.random.default_rng(3)
    x, z = rng.standard_normal((3, 2, 4, 4)).astype(np.float32), rng.standard_normal((3, 2, 4, 4)).astype(np.float32)
    s = np.array([0.2, 0.5, 1.0], dtype=np.float32)
    got = sch.scale_noise(x, s, z)
    for b in range(3):
        np.testing.assert_array_equal(got[b], sch.scale_noise(x[b:b + 1], s[b], z[b:b + 1])[0])
    np.testing.assert_array_equal(got[2], z[2])


def test_dynamic_mu_matches_pipeline():
    """The pipeline computes mu from pixel height/width when use_dynamic_shifting is set and mu is None."""
    ref, cfg = reference(use_dynamic_shifting=True, base_shift=0.4, max_shift=1.3,
                         base_image_seq_len=200, max_image_seq_len=5000)
    vae_scale, patch = 8, 2
    for height, width in [(512, 512), (1024, 1024), (1024, 768), (520, 712), (16, 16), (2048, 1536), (1000, 1000)]:
        seq = (int(height) // vae_scale // patch) * (int(width) // vae_scale // patch)
        mu_ref = sd3_img2img.calculate_shift(
            seq, ref.config.get("base_image_seq_len", 256), ref.config.get("max_image_seq_len", 4096),
            ref.config.get("base_shift", 0.5), ref.config.get("max_shift", 1.16))
        assert sch.image_seq_len(height // vae_scale, width // vae_scale, patch) == seq
        assert sch.dynamic_mu(cfg, height // vae_scale, width // vae_scale, patch) == mu_ref
        ref.set_timesteps(28, mu=mu_ref)
        ts, sig = sch.set_timesteps(cfg, 28, mu=sch.dynamic_mu(cfg, height // vae_scale, width // vae_scale, patch))
        assert_same(sig, ref.sigmas, "dynamic sigmas")
    for args in [(4096,), (256, 256, 4096, 0.5, 1.15), (1234, 100, 9000, 0.1, 2.0)]:
        assert sch.calculate_shift(*args) == sd3_img2img.calculate_shift(*args)


def test_sd3_defaults():
    """SD3's shipped scheduler config: shift 3.0; 28 steps at strength 0.6 run the last 17."""
    cfg = sch.SchedulerConfig.from_dict({"_class_name": "FlowMatchEulerDiscreteScheduler",
                                         "_diffusers_version": "0.29.0.dev0", "num_train_timesteps": 1000,
                                         "shift": 3.0})
    ts, sig = sch.set_timesteps(cfg, 28)
    assert ts.dtype == sig.dtype == np.float32 and ts.shape == (28,) and sig.shape == (29,)
    assert ts[0] == 1000.0 and sig[0] == 1.0 and sig[-1] == 0.0
    np.testing.assert_array_equal(ts, sig[:-1] * np.float32(1000))
    ts_run, sig_run = sch.img2img_timesteps(ts, sig, 28, 0.6)
    assert sch.img2img_start_index(28, 0.6) == 11 and len(ts_run) == 17 and len(sig_run) == 18


# --------------------------------------------------------------------------- config


def test_from_dict_reads_diffusers_json_and_ignores_extras():
    ref, cfg = reference(shift=2.5, use_dynamic_shifting=True, base_shift=0.3, max_shift=1.2, shift_terminal=0.05,
                         invert_sigmas=True, use_karras_sigmas=True, time_shift_type="linear",
                         num_train_timesteps=500, base_image_seq_len=128, max_image_seq_len=2048)
    for k in ("shift", "use_dynamic_shifting", "base_shift", "max_shift", "shift_terminal", "invert_sigmas",
              "use_karras_sigmas", "time_shift_type", "num_train_timesteps", "base_image_seq_len",
              "max_image_seq_len"):
        assert getattr(cfg, k) == ref.config[k], k
    d = {"shift": 3.0, "_use_default_values": ["x"], "_whatever": 1, "some_future_key": 5}
    assert sch.SchedulerConfig.from_dict(d) == sch.SchedulerConfig(shift=3.0)
    assert sch.SchedulerConfig.from_dict({}) == sch.SchedulerConfig()


@pytest.mark.parametrize("d,match", [
    ({"use_beta_sigmas": True}, "use_beta_sigmas"),
    ({"stochastic_sampling": True}, "stochastic_sampling"),
    ({"use_karras_sigmas": True, "use_exponential_sigmas": True}, "only one of"),
    ({"time_shift_type": "cubic"}, "time_shift_type"),
    ({"_class_name": "FlowMatchHeunDiscreteScheduler"}, "FlowMatchHeunDiscreteScheduler"),
    ({"shift": 0}, "shift must be > 0"),
    ({"shift": None}, "shift"),
    ({"shift": "3"}, "shift"),
    ({"shift_terminal": 1.0}, "shift_terminal"),
    ({"num_train_timesteps": 0}, "num_train_timesteps"),
    ({"num_train_timesteps": 1000.5}, "num_train_timesteps"),
    ({"invert_sigmas": "yes"}, "invert_sigmas"),
    ({"base_shift": float("nan")}, "base_shift"),
])
def test_from_dict_refuses(d, match):
    with pytest.raises(Sd3trtError, match=match):
        sch.SchedulerConfig.from_dict(d)


def test_from_dict_needs_a_mapping():
    with pytest.raises(Sd3trtError, match="JSON object"):
        sch.SchedulerConfig.from_dict([("shift", 3.0)])


# --------------------------------------------------------------------------- error paths


CFG = sch.SchedulerConfig(shift=3.0)
DYN = sch.SchedulerConfig(use_dynamic_shifting=True)


@pytest.mark.parametrize("call,match", [
    (lambda: sch.set_timesteps(CFG, 0), "at least 1"),
    (lambda: sch.set_timesteps(CFG, -3), "at least 1"),
    (lambda: sch.set_timesteps(CFG, 2.5), "integer"),
    (lambda: sch.set_timesteps(CFG, True), "integer"),
    (lambda: sch.set_timesteps(CFG), "steps"),
    (lambda: sch.set_timesteps(CFG, 4, sigmas=[1.0, 0.5]), "must agree"),
    (lambda: sch.set_timesteps(CFG, sigmas=[]), "non-empty"),
    (lambda: sch.set_timesteps(CFG, sigmas=[1.5, 0.5]), r"\[0, 1\]"),
    (lambda: sch.set_timesteps(CFG, sigmas=[1.0, float("nan")]), "finite"),
    (lambda: sch.set_timesteps(DYN, 10), "mu is required"),
    (lambda: sch.set_timesteps(DYN, 10, mu=float("inf")), "mu"),
    (lambda: sch.set_timesteps(sch.SchedulerConfig(use_exponential_sigmas=True), sigmas=[1.0, 0.0]), "positive"),
    (lambda: sch.set_timesteps(sch.SchedulerConfig(shift_terminal=0.1), sigmas=[1.0, 1.0]), "last sigma is 1"),
    (lambda: sch.dynamic_mu(sch.SchedulerConfig(use_dynamic_shifting=True, max_shift=None), 64, 64, 2),
     "max_shift"),
    (lambda: sch.dynamic_mu(sch.SchedulerConfig(use_dynamic_shifting=True, base_image_seq_len=4096), 64, 64, 2),
     "pass mu explicitly"),
    (lambda: sch.dynamic_mu(DYN, 64, 64, 0), "patch_size"),
    (lambda: sch.img2img_start_index(10, -0.1), "strength"),
    (lambda: sch.img2img_start_index(10, 1.01), "strength"),
    (lambda: sch.img2img_start_index(10, float("nan")), "strength"),
    (lambda: sch.img2img_start_index(10, 0.0), "no denoising step"),
    (lambda: sch.img2img_start_index(10, 1e-18), "no denoising step"),
    (lambda: sch.img2img_start_index(0, 0.5), "steps"),
    (lambda: sch.img2img_timesteps(*sch.set_timesteps(CFG, 10), 9, 0.5), "disagrees"),
    (lambda: sch.img2img_timesteps(np.zeros(10, np.float32), np.zeros(10, np.float32), 10, 0.5), "sigmas"),
    (lambda: sch.scale_noise(np.zeros((1, 4, 8, 8)), 0.5, np.zeros((1, 4, 8, 4))), "noise shape"),
    (lambda: sch.scale_noise(np.zeros((2, 4, 8, 8)), np.ones(3), np.zeros((2, 4, 8, 8))), "batch"),
    (lambda: sch.euler_step(np.zeros((1, 4, 8, 8)), np.zeros((2, 4, 8, 8)), 1.0, 0.5), "model output shape"),
])
def test_errors(call, match):
    with pytest.raises(Sd3trtError, match=match):
        call()


def test_single_step_with_shift_terminal_is_refused_where_diffusers_gives_nan():
    ref, cfg = reference(shift=3.0, shift_terminal=0.1)
    with np.errstate(invalid="ignore"):
        ref.set_timesteps(1)
    assert np.isnan(ref.sigmas[0].item())
    with pytest.raises(Sd3trtError, match="use more steps"):
        sch.set_timesteps(cfg, 1)


def test_any_positive_strength_runs_at_least_one_step():
    for n in (1, 7, 28, 49, 100):
        for strength in (1e-6, 1 / n, 0.5 / n, 0.999 / n):
            assert sch.img2img_start_index(n, strength) == n - 1
        assert sch.img2img_start_index(n, 1.0) == 0


def test_custom_sigmas_with_matching_steps_is_fine():
    a = sch.set_timesteps(CFG, 3, sigmas=[1.0, 0.6, 0.2])
    b = sch.set_timesteps(CFG, sigmas=[1.0, 0.6, 0.2])
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_mu_math_is_python_float():
    mu = sch.dynamic_mu(DYN, 128, 128, 2)  # 4096 tokens -> max_shift
    assert isinstance(mu, float) and math.isclose(mu, 1.15)

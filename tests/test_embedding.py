"""The embedding API as a host program meets it: arrays in and out, Plan, threads, cancellation, silence."""

from __future__ import annotations

import ast
import ctypes
import io
import logging
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import sd3trt
from sd3trt.errors import Sd3trtError
from sd3trt.runtime import arrays, dlpack, images
from sd3trt.runtime.runners import Runner

ROOT = Path(__file__).resolve().parents[1]
KW = dict(strength=0.7, steps=3, guidance_scale=5.0, seed=4, max_sequence_length=16)


def pixels(w=64, h=48, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def pipe(tiny_sd3):
    with sd3trt.Img2Img.from_bundle(tiny_sd3[1]) as p:
        yield p


class DLPackOnly:
    """A tensor that offers nothing but the DLPack protocol (as torch, cupy, jax do), over a numpy array;
    it records the stream each __dlpack__ call was given."""

    def __init__(self, a: np.ndarray, device: int = dlpack.CPU):
        self.a, self.device, self.streams = a, device, []

    def __dlpack__(self, stream=None, **kw):
        self.streams.append(stream)
        return self.a.__dlpack__(**kw)

    def __dlpack_device__(self):
        return (self.device, 0)


# ------------------------------------------------------------------------------------------- arrays


def test_every_image_form_gives_the_same_result(pipe):
    u8 = pixels()
    ref = pipe(u8, "a fox", **KW)
    png = io.BytesIO()
    Image.fromarray(u8).save(png, "PNG")
    forms = {
        "PIL": Image.fromarray(u8), "png bytes": png.getvalue(), "DLPack": DLPackOnly(u8),
        "buffer": memoryview(u8), "float CHW in [0, 1]": u8.transpose(2, 0, 1).astype(np.float32) / 255.0,
    }
    for name, image in forms.items():
        np.testing.assert_array_equal(pipe(image, "a fox", **KW).array, ref.array, err_msg=name)


def test_results_are_arrays(pipe):
    res = pipe(pixels(), "a fox", num_images=2, **KW)
    assert res.array.dtype == np.uint8 and res.array.shape == (2, 48, 64, 3)
    assert res.decoded.dtype == np.float32 and res.decoded.shape == (2, 3, 48, 64)
    np.testing.assert_array_equal(res.array, images.to_uint8(res.decoded))  # the quantized decoded images
    for i, im in enumerate(res.images):  # PIL stays a convenience over the same pixels
        np.testing.assert_array_equal(np.asarray(im), res.array[i])


def test_cpu_tensors_are_read_without_a_copy():
    u8 = pixels()
    for source in (u8, DLPackOnly(u8), memoryview(u8)):
        assert np.shares_memory(arrays.as_pixel_array(source), u8)
    f = u8.transpose(2, 0, 1).astype(np.float32) / 255
    assert np.shares_memory(arrays.as_pixel_array(DLPackOnly(f)), f)


def test_results_written_into_the_callers_arrays(pipe):
    u8, f32 = np.zeros((1, 48, 64, 3), np.uint8), np.zeros((1, 3, 48, 64), np.float32)
    res = pipe(pixels(), "a fox", out=u8, **KW)
    np.testing.assert_array_equal(u8, res.array)
    res = pipe.run(pipe.prepare(pixels(), "a fox", **KW), out=DLPackOnly(f32))
    np.testing.assert_array_equal(f32, res.decoded)
    with pytest.raises(Sd3trtError, match=r"out is uint8 \[1, 64, 64, 3\]; this result is uint8 \[1, 48, 64, 3\]"):
        pipe(pixels(), "a fox", out=np.zeros((1, 64, 64, 3), np.uint8), **KW)


@pytest.mark.parametrize("image,match", [
    (np.zeros((3, 32, 32), np.uint8), r"uint8 \[H, W, 3\] or float \[3, H, W\] in \[0, 1\]; got uint8 \[3, 32, 32\]"),
    (np.zeros((32, 32, 3), np.float32), r"got float32 \[32, 32, 3\]"),
    (np.full((3, 32, 32), 255.0, np.float32), r"values in \[0, 1\], got min 255.0"),
    (np.full((3, 32, 32), -0.5, np.float32), r"x / 2 \+ 0.5 from \[-1, 1\]"),
    (np.full((3, 32, 32), np.nan, np.float32), r"values in \[0, 1\]"),
    (np.zeros((32, 32, 3), np.int64), r"got int64"),
    (np.broadcast_to(np.uint8(0), (4000, 5000, 3)), "over the decompression-bomb limit"),
    (np.zeros((8, 8, 3), np.uint8), "smaller than 16 px"),
])
def test_bad_arrays_are_refused_in_one_sentence(pipe, image, match):
    with pytest.raises(sd3trt.RequestError, match=match) as e:
        pipe.prepare(image, "x", max_pixels=10**7)
    assert e.value.field == "image" and "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------- Plan


def test_prepare_checks_without_engines_and_run_repeats(tiny_sd3):
    with sd3trt.Img2Img.from_bundle(tiny_sd3[1]) as p:
        plan = p.prepare(pixels(70, 50), "a fox", "blurry", strength=0.5, steps=6, guidance_scale=4.0, seed=1,
                         num_images=2, max_sequence_length=16)
        assert p.loaded_components == ()  # nothing loaded, nothing run
        assert (plan.input_size, plan.width, plan.height) == ((70, 50), 64, 48)
        assert plan.cfg and plan.steps == 6 and plan.steps_run == 3 and len(plan.sigmas) == 4
        assert plan.latent_shape == (2, 16, 6, 8) and plan.noise.posterior.shape == (1, 16, 6, 8)
        assert plan.pixels.shape == (1, 3, 48, 64) and not plan.pixels.flags.writeable
        assert not plan.timesteps.flags.writeable and not plan.noise.latents.flags.writeable
        assert "pixels" not in repr(plan) and "a fox" in repr(plan)
        a, b = p.run(plan), p.run(plan)
        np.testing.assert_array_equal(a.array, b.array)
        c = p(pixels(70, 50), "a fox", "blurry", strength=0.5, steps=6, guidance_scale=4.0, seed=1, num_images=2,
              max_sequence_length=16)
        np.testing.assert_array_equal(a.array, c.array)
        assert "image_in" in c.timings and "image_in" not in a.timings
        assert not p.prepare(pixels(), "x", guidance_scale=1.0, **{k: v for k, v in KW.items() if k != "guidance_scale"}).cfg


@pytest.mark.parametrize("kw,field,match", [
    (dict(strength=1.5), "strength", r"strength must be a number in \[0, 1\]"),
    (dict(strength=0.0), "strength", "no denoising step"),
    (dict(steps=0), "steps", "steps must be at least 1"),
    (dict(steps=2.5), "steps", "integer"),
    (dict(guidance_scale=float("inf")), "guidance_scale", "finite number >= 0"),
    (dict(num_images=0), "num_images", "at least 1"),
    (dict(num_images=True), "num_images", "integer"),
    (dict(max_sequence_length=513), "max_sequence_length", r"in 1\.\.512"),
    (dict(seed=-1), "seed", "at least 0"),
    (dict(prompt=None), "prompt", "prompt must be a string"),
    (dict(negative_prompt=3), "negative_prompt", "must be a string"),
    (dict(noise=sd3trt.Noise(np.zeros((1, 16, 4, 4), np.float32))), "noise", r"needs \(1, 16, 6, 8\)"),
    (dict(noise=np.zeros(3)), "noise", "sd3trt Noise"),
    (dict(sigmas=[1.5, 0.5]), "sigmas", r"\[0, 1\]"),
    (dict(image="/nonexistent.png"), "image", "does not exist"),
])
def test_each_bad_parameter_is_named(pipe, kw, field, match):
    request = {"image": pixels(), "prompt": "x", **KW, **kw}
    with pytest.raises(sd3trt.RequestError, match=match) as e:
        pipe.prepare(request.pop("image"), **request)
    assert e.value.field == field and isinstance(e.value, Sd3trtError)


def test_run_takes_only_plans_and_tokens(pipe):
    with pytest.raises(Sd3trtError, match="run takes a Plan"):
        pipe.run({"prompt": "x"})
    with pytest.raises(Sd3trtError, match="cancel must be"):
        pipe(pixels(), "x", cancel=True, **KW)


# ------------------------------------------------------------------------------------------- threads


class Probe(Runner):
    """Wraps a runner as an engine that cannot run two calls at once, and records overlapping calls."""

    thread_safe = False
    active: dict[str, int] = {}
    worst: dict[str, int] = {}
    guard = threading.Lock()

    def __init__(self, inner):
        self.inner = inner
        super().__init__(inner.name, {"inputs": [], "outputs": []})
        self.inputs = inner.inputs

    def _run(self, feeds):
        with self.guard:
            self.active[self.name] = self.active.get(self.name, 0) + 1
            self.worst[self.name] = max(self.worst.get(self.name, 0), self.active[self.name])
        try:
            time.sleep(0.002)  # widen the window two unguarded calls would need to overlap
            return self.inner.execute(feeds)
        finally:
            with self.guard:
                self.active[self.name] -= 1


REQUESTS = [
    dict(prompt="a fox", seed=1, steps=4, strength=0.6),
    dict(prompt="a castle", seed=2, steps=3, strength=1.0, guidance_scale=1.0),
    dict(prompt="a boat", seed=3, steps=5, strength=0.5, num_images=2, negative_prompt="fog"),
    dict(prompt="a fox", seed=4, steps=3, strength=0.8, max_sequence_length=8),
]


def _concurrently(fn, args) -> list:
    results, errors = [None] * len(args), []
    start = threading.Barrier(len(args))

    def work(i):
        try:
            start.wait()
            results[i] = fn(args[i])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(args))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results


def test_which_engines_take_turns():
    from sd3trt.runtime.runners import OrtRunner
    from sd3trt.runtime.trt_runner import TrtRunner

    assert OrtRunner.thread_safe and not TrtRunner.thread_safe  # one stream and buffer set per TensorRT runner


@pytest.mark.parametrize("low_memory", [False, True], ids=["loaded", "low-memory"])
def test_threads_get_the_sequential_results(tiny_sd3, low_memory):
    image = pixels()
    with sd3trt.Img2Img.from_bundle(tiny_sd3[1]) as seq_pipe:
        expected = [seq_pipe(image, **r).array for r in REQUESTS]
    in_flight, most = [0], [0]
    lock = threading.Lock()

    def call(r):
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
        try:
            return shared(image, **r).array
        finally:
            with lock:
                in_flight[0] -= 1

    Probe.worst.clear()
    shared = _wrapped_pipe(tiny_sd3[1], Probe, low_memory=low_memory, prompt_cache=2)
    with shared:
        for _ in range(2):
            got = _concurrently(call, REQUESTS * 2)
            for i, a in enumerate(got):
                np.testing.assert_array_equal(a, expected[i % len(REQUESTS)])
        assert len(shared.prompts.cache) <= 2
        assert len(shared.loaded_components) == (0 if low_memory else 6)
    assert most[0] >= 2  # the runs really overlapped ...
    assert Probe.worst and max(Probe.worst.values()) == 1  # ... and no engine call did


# ------------------------------------------------------------------------------------------- cancellation


class Counting(Runner):
    """Counts calls and lets a test act between them."""

    def __init__(self, inner, on_call=None):
        super().__init__(inner.name, {"inputs": [], "outputs": []})
        self.inner, self.inputs, self.calls, self.on_call = inner, inner.inputs, 0, on_call

    def _run(self, feeds):
        self.calls += 1
        if self.on_call:
            self.on_call(self.calls)
        return self.inner.execute(feeds)


def _wrapped_pipe(bundle, wrap, **kw):
    """A pipeline whose runners are its own default runners wrapped by `wrap` (through runner_factory)."""
    pipe = sd3trt.Img2Img.from_bundle(bundle, runner_factory=lambda name: wrap(pipe.default_runner(name)), **kw)
    return pipe


def _counting_pipe(bundle, on_call=None, **kw):
    runners = {}

    def wrap(inner):
        runners[inner.name] = Counting(inner, on_call if inner.name == "transformer" else None)
        return runners[inner.name]

    return _wrapped_pipe(bundle, wrap, **kw), runners


def test_cancel_from_another_thread_stops_within_one_step(tiny_sd3):
    token, asked = sd3trt.Cancel(), threading.Event()
    canceller = threading.Thread(target=lambda: (asked.wait(5), token.cancel()))
    canceller.start()

    def progress(i, n):
        if i == 2:  # after step 2, another thread cancels; the run must not start step 3
            asked.set()
            canceller.join(5)

    p, runners = _counting_pipe(tiny_sd3[1])
    with p, pytest.raises(sd3trt.Cancelled, match="at step 3 of 6"):
        p(pixels(), "a fox", steps=6, strength=1.0, seed=0, progress=progress, cancel=token)
    assert runners["transformer"].calls == 2 and "vae_decoder" not in runners


def test_cancel_while_a_step_runs(tiny_sd3):
    """A cancel that lands during a step lets that step finish and runs no other."""
    token = threading.Event()  # any object with is_set() serves
    seen = []

    def on_call(n):
        if n == 3:
            threading.Thread(target=token.set).start()
            time.sleep(0.05)
        seen.append(n)

    p, runners = _counting_pipe(tiny_sd3[1], on_call=on_call, low_memory=True)
    with p:
        with pytest.raises(sd3trt.Cancelled):
            p(pixels(), "a fox", steps=8, strength=1.0, seed=0, cancel=token)
        assert seen == [1, 2, 3] and p.loaded_components == ()  # low memory: nothing left loaded
        assert p(pixels(), "a fox", steps=2, seed=0).array.shape == (1, 48, 64, 3)  # the pipeline still works


def test_cancelled_before_the_run_loads_nothing(tiny_sd3):
    token = sd3trt.Cancel()
    token.cancel()
    with sd3trt.Img2Img.from_bundle(tiny_sd3[1]) as p:
        plan = p.prepare(pixels(), "x", **KW)
        with pytest.raises(sd3trt.Cancelled, match="before the text encoders"):
            p.run(plan, cancel=token)
        assert p.loaded_components == ()
    assert not issubclass(sd3trt.Cancelled, Sd3trtError)


# ------------------------------------------------------------------------------------------- silence


def test_an_api_run_prints_nothing(tiny_sd3, capfd):
    with sd3trt.Img2Img.from_bundle(tiny_sd3[1], low_memory=True) as p:
        p(pixels(), " ".join(["long prompt"] * 100), **KW)  # truncation: a Result warning, not output
    assert capfd.readouterr() == ("", "")
    assert any(isinstance(h, logging.NullHandler) for h in logging.getLogger("sd3trt").handlers)


def test_only_the_cli_prints():
    calls = []
    for path in sorted((ROOT / "runtime").glob("*.py")):
        if path.name == "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                calls.append(f"{path.name}:{node.lineno}")
    assert calls == []


def test_the_public_surface():
    for name in ("Img2Img", "Plan", "Result", "Noise", "Cancel", "Cancelled", "RequestError", "Sd3trtError"):
        obj = getattr(sd3trt, name)
        assert obj.__doc__, name
    assert set(sd3trt.__all__) >= {"Img2Img", "Plan", "Result", "Noise", "Cancel", "Cancelled"}
    for method in ("prepare", "run", "__call__", "default_runner", "close"):
        assert getattr(sd3trt.Img2Img, method).__doc__, method
    with pytest.raises(AttributeError):
        sd3trt.NoSuchThing  # noqa: B018


# ------------------------------------------------------------------------------------------- GPU edges


class FakeCopies:
    """cuda-bindings' cudaMemcpyAsync and cudaStreamSynchronize over host memory (ctypes.memmove)."""

    cudaMemcpyKind = SimpleNamespace(cudaMemcpyDeviceToHost=2, cudaMemcpyHostToDevice=1)

    def __init__(self):
        self.calls = []

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        ctypes.memmove(dst, src, nbytes)
        self.calls.append(("copy", kind, nbytes, stream))
        return (0,)

    def cudaStreamSynchronize(self, stream):
        self.calls.append(("sync", stream))
        return (0,)


def test_dlpack_capsules_are_read_right():
    a = np.arange(24, dtype=np.float16).reshape(2, 3, 4)
    t = dlpack.describe(a)
    assert (t.ptr, t.shape, t.dtype, t.device, t.nbytes) == (a.ctypes.data, (2, 3, 4), np.float16, (1, 0), 48)
    assert dlpack.describe(a[1]).ptr == a[1].ctypes.data
    with pytest.raises(Sd3trtError, match=r"not contiguous \(strides"):
        dlpack.describe(a.transpose(2, 1, 0))
    with pytest.raises(Sd3trtError, match="no numpy dtype"):
        dlpack.describe(np.zeros(3, np.complex64))


def test_stream_handles():
    assert dlpack.stream_handle(None) is None and dlpack.stream_handle(7) == 7
    assert dlpack.stream_handle(SimpleNamespace(cuda_stream=11)) == 11  # torch.cuda.Stream
    assert dlpack.stream_handle(SimpleNamespace(ptr=12)) == 12  # cupy.cuda.Stream
    assert dlpack.stream_handle(SimpleNamespace(__cuda_stream__=lambda: (0, 13))) == 13
    with pytest.raises(Sd3trtError, match="CUDA stream handle"):
        dlpack.stream_handle("default")


def test_device_copies_use_the_callers_stream():
    rt, src = FakeCopies(), pixels()
    tensor = DLPackOnly(src, device=dlpack.CUDA)
    got = dlpack.to_host(tensor, stream=None, rt=rt)
    np.testing.assert_array_equal(got, src)
    assert not np.shares_memory(got, src) and rt.calls == [("copy", 2, src.nbytes, 0), ("sync", 0)]
    out = np.zeros((1, 3, 48, 64), np.float32)
    result = np.random.default_rng(0).random((1, 3, 48, 64), dtype=np.float32)
    rt.calls.clear()
    dlpack.copy_into(DLPackOnly(out, device=dlpack.CUDA), (np.zeros((1, 48, 64, 3), np.uint8), result), rt=rt)
    np.testing.assert_array_equal(out, result)
    assert rt.calls == [("copy", 1, result.nbytes, 0), ("sync", 0)]
    with pytest.raises(Sd3trtError, match="out is float32"):
        dlpack.copy_into(DLPackOnly(np.zeros((2, 2), np.float32), device=dlpack.CUDA), (result,), rt=rt)


@pytest.mark.gpu
def test_cuda_tensors_in_and_out_on_the_callers_stream(pipe):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device visible to torch")
    u8 = pixels()
    ref = pipe(u8, "a fox", **KW)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        image = torch.from_numpy(u8).cuda()
        out = torch.zeros((1, 48, 64, 3), dtype=torch.uint8, device="cuda")
    res = pipe(image, "a fox", out=out, stream=stream, **KW)
    np.testing.assert_array_equal(res.array, ref.array)
    np.testing.assert_array_equal(out.cpu().numpy(), ref.array)


def test_which_onnx_file_each_component_runs(tiny_sd3, tmp_path):
    bundle = Path(tiny_sd3[1])
    copy = tmp_path / "t.onnx"
    copy.write_bytes((bundle / "onnx" / "transformer.onnx").read_bytes())
    with sd3trt.Img2Img.from_bundle(bundle, onnx_files={"transformer": copy}) as p:
        files = p.onnx_files
        assert files["transformer"] == copy and files["vae_decoder"] == bundle / "onnx" / "vae_decoder.onnx"
        assert set(files) == {"clip_l", "clip_g", "t5", "vae_encoder", "vae_decoder", "transformer"}
        with pytest.raises(TypeError):
            files["transformer"] = bundle  # a read-only view
        p(pixels(), "x", **KW)
        copy.unlink()  # the runner loaded the file it names
    with pytest.raises(Sd3trtError, match=r"onnx_files names \['unet'\]"):
        sd3trt.Img2Img.from_bundle(bundle, onnx_files={"unet": copy})
    with pytest.raises(Sd3trtError, match=r"transformer: ONNX file .*t\.onnx is missing"):
        sd3trt.Img2Img.from_bundle(bundle, onnx_files={"transformer": copy}).runner("transformer")

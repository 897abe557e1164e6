"""Calibration: transformer inputs recorded from real img2img runs of the bundle, and activation ranges.

    data = collect(bundle, CalibSettings(prompts=8))          # cached in <bundle>/calibration/<key>.npz
    fit, held_out = data.split()                               # the last `holdout` prompts judge accuracy
    amax = activation_ranges(bundle.onnx_path("transformer"), plan.taps(), data, fit, method="max")

`collect` runs `Img2Img` over a fixed set of prompts and generated pictures with the fp32 ONNX Runtime
runners, wrapping the transformer's runner to record every call (each denoising step of each run, CFG
batch included). Text conditioning is the same for every step of a run, so it is stored once per run.
The cache key hashes the settings and every bundle file the runs depend on (sha256 from the manifest),
so a re-export or other settings give a new file and an unchanged bundle reuses the old one.

Activation ranges (absolute max per tensor, symmetric quantization) come from the fp32 transformer run
on the recorded inputs with the measured tensors added as outputs:
  max         the largest |x| seen (one pass; reductions happen inside the graph)
  percentile  the `percentile`-th percentile of |x| over all calibration values (a histogram pass)
  mse         the clip value minimizing the expected quantize-dequantize error of the histogram for the
              target format (int8: uniform steps; fp8: steps relative to magnitude)
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from sd3trt.errors import Sd3trtError
from sd3trt.files import write_bytes_atomic

FORMAT = 1
METHODS = ("max", "percentile", "mse")
BINS = 4096
PROMPTS = (
    "a red fox standing in fresh snow, morning light, detailed fur",
    "a watercolor painting of a harbor with sailing boats at sunset",
    "portrait photo of an old fisherman with a grey beard, studio lighting",
    "a futuristic city skyline at night, neon signs, rain on the streets",
    "a bowl of ramen on a wooden table, steam rising, shallow depth of field",
    "an oil painting of a mountain lake surrounded by pine trees",
    "a cute robot reading a book in a cozy library, digital art",
    "aerial view of green rice terraces in the mist",
    "a vintage car parked in front of a pastel colored house",
    "macro photograph of a dew covered spider web",
    "a knight in ornate armor riding a horse through a forest, cinematic",
    "a minimalist poster of a hot air balloon over the desert",
    "a golden retriever puppy playing with a ball in the grass",
    "a medieval castle on a cliff above a stormy sea",
    "a plate of colorful macarons, food photography",
    "an astronaut floating above the earth, highly detailed",
)
NEGATIVES = ("", "blurry, low quality, deformed")


@dataclass(frozen=True)
class CalibSettings:
    """Defaults that represent real use: SD3.5's 1024 px and 28 steps, img2img at strength 0.75 (21 transformer
    calls a run), 12 prompts of different subjects and styles (a quarter held out for the gate). `scaled(f)`
    is the knob for small machines (`sd3trt quantize --calib-scale`): fewer runs and steps, same sizes."""

    prompts: int = 12  # img2img runs (one prompt and one picture each)
    holdout: int = 3  # the last runs, kept out of the ranges and used by the accuracy gate
    steps: int = 28
    strength: float = 0.75
    guidance: float = 7.0
    size: int = 1024  # image side in px (capped by the model's largest side)
    seed: int = 0
    max_sequence_length: int = 256

    def scaled(self, factor: float) -> "CalibSettings":
        """Runs and steps times `factor` (>= 2 runs with >= 1 held out, >= 2 steps); the image size is kept, as
        the attention's sequence length shapes the activations."""
        if not 0 < factor <= 1:
            raise Sd3trtError(f"--calib-scale {factor} must be in (0, 1]")
        prompts = max(2, round(self.prompts * factor))
        return CalibSettings(**{**asdict(self), "prompts": prompts, "holdout": max(1, round(prompts / 4)),
                                "steps": max(2, round(self.steps * factor))})

    def checked(self, facts) -> "CalibSettings":
        if self.prompts < 2:
            raise Sd3trtError(f"--calib-prompts must be at least 2 (one to fit, one held out), got {self.prompts}")
        if not 1 <= self.holdout < self.prompts:
            raise Sd3trtError(f"the held-out runs ({self.holdout}) must be at least 1 and fewer than --calib-prompts")
        side = min(self.size, facts.max_image_side)
        side -= side % facts.pixel_multiple
        if side < facts.pixel_multiple:
            raise Sd3trtError(f"--calib-size {self.size} is smaller than {facts.pixel_multiple} px")
        return CalibSettings(**{**asdict(self), "size": side})


def picture(index: int, side: int):
    """A deterministic synthetic picture (gradients, discs, stripes, noise), different for each index."""
    from PIL import Image

    rng = np.random.default_rng(1000 + index)
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / side
    c = rng.uniform(0, 1, (3, 3)).astype(np.float32)
    img = np.stack([c[k, 0] * x + c[k, 1] * y + c[k, 2] * (1 - x) * y for k in range(3)], -1)
    for _ in range(rng.integers(2, 6)):
        cx, cy, r = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.05, 0.3)
        img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.uniform(0, 1, 3)
    if index % 2:
        img *= (0.75 + 0.25 * np.sin(x * rng.uniform(10, 60)))[..., None]
    img = img + rng.normal(0, rng.uniform(0.01, 0.08), img.shape)
    return Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8), "RGB")


def run_inputs(settings: CalibSettings, index: int) -> dict:
    """The img2img request of calibration run `index` (also what the accuracy gate replays)."""
    return {
        "image": picture(index, settings.size),
        "prompt": PROMPTS[index % len(PROMPTS)],
        "negative_prompt": NEGATIVES[index % len(NEGATIVES)],
        "strength": settings.strength, "steps": settings.steps, "guidance_scale": settings.guidance,
        "seed": settings.seed + index, "max_sequence_length": settings.max_sequence_length,
    }


@dataclass
class CalibData:
    hidden_states: np.ndarray  # [N, B, C, h, w]
    timestep: np.ndarray  # [N, B]
    context: np.ndarray  # [N] -> row of encoder_hidden_states / pooled_projections
    encoder_hidden_states: np.ndarray  # [R, B, S, D]
    pooled_projections: np.ndarray  # [R, B, P]
    run: np.ndarray  # [N] calibration run (prompt) index
    settings: dict
    key: str = ""
    seconds: float = 0.0  # time the runs took to record
    reused: bool = False  # loaded from the cache rather than recorded now

    def __len__(self) -> int:
        return len(self.hidden_states)

    def feeds(self, i: int) -> dict[str, np.ndarray]:
        c = int(self.context[i])
        return {
            "hidden_states": self.hidden_states[i],
            "encoder_hidden_states": self.encoder_hidden_states[c],
            "pooled_projections": self.pooled_projections[c],
            "timestep": self.timestep[i],
        }

    def split(self) -> tuple[list[int], list[int]]:
        """(indices that fit the ranges, held-out indices the accuracy gate uses)."""
        first_held = self.settings["prompts"] - self.settings["holdout"]
        fit = [i for i in range(len(self)) if self.run[i] < first_held]
        held = [i for i in range(len(self)) if self.run[i] >= first_held]
        return fit, held

    def save(self, path: Path) -> None:
        buf = io.BytesIO()
        np.savez(buf, hidden_states=self.hidden_states, timestep=self.timestep, context=self.context,
                 encoder_hidden_states=self.encoder_hidden_states, pooled_projections=self.pooled_projections,
                 run=self.run, meta=np.array(json.dumps({"format": FORMAT, "settings": self.settings, "key": self.key,
                                                       "seconds": self.seconds})))
        write_bytes_atomic(Path(path), buf.getvalue())

    @classmethod
    def load(cls, path: Path) -> "CalibData":
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta.get("format") != FORMAT:
                raise ValueError("old calibration format")
            return cls(z["hidden_states"], z["timestep"], z["context"], z["encoder_hidden_states"],
                       z["pooled_projections"], z["run"], meta["settings"], meta["key"],
                       float(meta.get("seconds", 0.0)), True)


class _Recorder:
    """Wraps the transformer runner; stores what every call gets."""

    def __init__(self, inner, sink: dict):
        self.inner = inner
        self.sink = sink

    def run(self, feeds):
        s = self.sink
        enc, pooled = feeds["encoder_hidden_states"], feeds["pooled_projections"]
        if not s["enc"] or not (np.array_equal(s["enc"][-1], enc) and np.array_equal(s["pooled"][-1], pooled)):
            s["enc"].append(enc.copy())
            s["pooled"].append(pooled.copy())
        s["hidden"].append(feeds["hidden_states"].copy())
        s["t"].append(feeds["timestep"].copy())
        s["context"].append(len(s["enc"]) - 1)
        s["run"].append(s["current_run"])
        return self.inner.run(feeds)

    def close(self):
        self.inner.close()

    def __getattr__(self, name):
        return getattr(self.inner, name)


def cache_key(bundle, settings: CalibSettings) -> str:
    files = {}
    for section in ("components", "tokenizers"):
        for entry in bundle.data.get(section, {}).values():
            files.update(entry.get("files", {}))
    blob = json.dumps({"format": FORMAT, "settings": asdict(settings), "files": files,
                       "scheduler": bundle.scheduler_config, "dtype": bundle.dtype}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def collect(bundle, settings: CalibSettings = CalibSettings(), cache_dir: Path | None = None, threads: int = 0,
            log: Callable[[str], None] = print) -> CalibData:
    """Record the transformer's inputs over `settings.prompts` img2img runs (cached on disk)."""
    from sd3trt.runtime.pipeline import Img2Img

    settings = settings.checked(bundle.facts)
    key = cache_key(bundle, settings)
    path = Path(cache_dir or bundle.root / "calibration") / f"transformer-{key[:16]}.npz"
    if path.is_file():
        try:
            data = CalibData.load(path)
            if data.key == key:
                log(f"calibration: reusing {path} ({len(data)} transformer calls)")
                return data
        except (OSError, ValueError, KeyError):
            pass  # damaged or old: record again
    from sd3trt.runtime.runners import OrtRunner

    sink = {"enc": [], "pooled": [], "hidden": [], "t": [], "context": [], "run": [], "current_run": 0}

    def factory(name: str):
        r = OrtRunner(name, bundle.component(name), bundle.onnx_path(name), threads=threads)
        return _Recorder(r, sink) if name == "transformer" else r

    pipe = Img2Img(bundle, runner_factory=factory, threads=threads)
    t0 = time.perf_counter()
    for i in range(settings.prompts):
        sink["current_run"] = i
        pipe(**run_inputs(settings, i))
        log(f"calibration: run {i + 1}/{settings.prompts} recorded ({len(sink['hidden'])} transformer calls)")
    data = CalibData(np.stack(sink["hidden"]), np.stack(sink["t"]), np.array(sink["context"], np.int32),
                     np.stack(sink["enc"]), np.stack(sink["pooled"]), np.array(sink["run"], np.int32),
                     asdict(settings), key, round(time.perf_counter() - t0, 1))
    data.save(path)
    return data


# --------------------------------------------------------------------------- activation ranges


class _TappedSession:
    """The fp32 transformer with extra outputs, as an ONNX Runtime session (weights stay on disk)."""

    def __init__(self, onnx_path: Path, outputs: list[tuple[str, str]], extra_nodes=(), threads: int = 0):
        import onnx
        from onnx import TensorProto, helper

        from sd3trt.runtime.ort_session import ort_session

        onnx_path = Path(onnx_path)
        model = onnx.load(str(onnx_path), load_external_data=False)
        del model.graph.output[:]
        model.graph.node.extend(extra_nodes)
        for name, _ in outputs:
            model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
        self.names = [n for n, _ in outputs]
        external = any(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer)
        if external:  # save next to the original so the external weight file resolves
            fd, tmp = tempfile.mkstemp(dir=onnx_path.parent, prefix=".calib-", suffix=".onnx")
            os.close(fd)
            try:
                onnx.save_model(model, tmp)
                self.session = ort_session(tmp, threads)
            finally:
                Path(tmp).unlink(missing_ok=True)
        else:
            self.session = ort_session(model.SerializeToString(), threads)

    def run(self, feeds) -> list[np.ndarray]:
        return self.session.run(self.names, feeds)


def _absmax_nodes(taps: list[str]):
    from onnx import helper

    nodes, outs = [], []
    for i, t in enumerate(taps):
        a, m = f"__calib_abs_{i}", f"__calib_amax_{i}"
        nodes.append(helper.make_node("Abs", [t], [a], name=f"__calib_Abs_{i}"))
        nodes.append(helper.make_node("ReduceMax", [a], [m], keepdims=0, name=f"__calib_ReduceMax_{i}"))
        outs.append((m, t))
    return nodes, outs


def _fp8_step(x: np.ndarray, scale: float) -> np.ndarray:
    """Spacing of float8 e4m3 values around x / scale, in units of x (subnormal floor 2^-9)."""
    e = np.floor(np.log2(np.maximum(x / scale, 2.0**-6)))
    return np.exp2(e - 3) * scale


def _mse_clip(hist: np.ndarray, edges: np.ndarray, precision: str) -> float:
    """Clip value with the least expected quantize-dequantize squared error over the histogram."""
    centers = (edges[:-1] + edges[1:]) / 2
    amax = float(edges[-1])
    best, best_err = amax, np.inf
    for c in np.linspace(0.2, 1.0, 81) * amax:
        inside = centers <= c
        if precision == "int8":
            noise = np.full_like(centers, (c / 127.0) ** 2 / 12)
        else:
            noise = _fp8_step(np.minimum(centers, c), c / 448.0) ** 2 / 12
        err = np.where(inside, noise, (centers - c) ** 2 + noise)
        total = float((hist * err).sum())
        if total < best_err:
            best, best_err = float(c), total
    return best


def activation_ranges(onnx_path: Path, taps: list[str], data: CalibData, indices: list[int], method: str = "max",
                      percentile: float = 99.99, precision: str = "int8", threads: int = 0,
                      max_tensors_per_pass: int = 32, log: Callable[[str], None] = print) -> dict[str, float]:
    """tensor name -> absolute range to quantize it with (see the module docstring for the methods)."""
    if method not in METHODS:
        raise Sd3trtError(f"unknown calibration method {method!r}; use {', '.join(METHODS)}")
    if not indices:
        raise Sd3trtError("no calibration inputs to measure ranges on; use more --calib-prompts")
    if not 50.0 < percentile <= 100.0:
        raise Sd3trtError(f"--percentile {percentile} must be in (50, 100]")
    nodes, outs = _absmax_nodes(taps)
    sess = _TappedSession(onnx_path, outs, nodes, threads)
    amax = dict.fromkeys(taps, 0.0)
    for i in indices:
        for (_, t), v in zip(outs, sess.run(data.feeds(i))):
            amax[t] = max(amax[t], float(v))
    del sess
    if method == "max":
        return amax
    ranges = {}
    for start in range(0, len(taps), max_tensors_per_pass):
        group = taps[start:start + max_tensors_per_pass]
        sess = _TappedSession(onnx_path, [(t, t) for t in group], threads=threads)
        hists = {t: np.zeros(BINS, np.float64) for t in group}
        for i in indices:
            for t, v in zip(group, sess.run(data.feeds(i))):
                hists[t] += np.histogram(np.abs(v), bins=BINS, range=(0.0, max(amax[t], 1e-12)))[0]
        del sess
        for t in group:
            edges = np.linspace(0.0, max(amax[t], 1e-12), BINS + 1)
            if method == "percentile":
                cdf = np.cumsum(hists[t]) / max(hists[t].sum(), 1.0)
                k = int(np.searchsorted(cdf, percentile / 100.0))
                ranges[t] = float(edges[min(k + 1, BINS)])
            else:
                ranges[t] = _mse_clip(hists[t], edges, precision)
        if len(taps) > max_tensors_per_pass:
            log(f"calibration: ranges for {min(start + max_tensors_per_pass, len(taps))}/{len(taps)} tensors")
    return ranges

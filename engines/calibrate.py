"""Calibration: transformer inputs recorded from real img2img runs of the bundle, and activation ranges.

    data = collect(bundle, CalibSettings(prompts=8))          # cached in <bundle>/calibration/<key>.npz
    fit, held_out = data.split()                               # the last `holdout` prompts judge accuracy
    amax = activation_ranges(bundle.onnx_path("transformer"), plan.taps(), data, fit, method="max")

`collect` runs `Img2Img` over a fixed set of prompts (or the user's, `--calib-prompts FILE`) and generated
pictures with the runners of a calibration backend (engines/calib_backends.py: CUDA, OpenVINO or ONNX
Runtime, in the bundle's type or OpenVINO's bf16), wrapping the transformer's runner to record and time
every call (each denoising step of each run, CFG batch included). Text conditioning is the same for every
step of a run, so it is stored once per run. The cache key hashes the settings, the backend and every
bundle file the runs depend on (sha256 from the manifest), so a re-export or other settings give a new
file and an unchanged bundle reuses the old one.

Activation ranges (absolute max per tensor, symmetric quantization) come from the bundle's transformer
run by the backend on the recorded inputs, with the measured tensors added as outputs - the whole graph
at once, or one transformer block at a time (engines/calib_blocks.py; the same ranges in bounded memory):
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
    prompt_texts: tuple = ()  # the user's prompts (`--calib-prompts FILE`), one a run, in place of PROMPTS

    def scaled(self, factor: float) -> "CalibSettings":
        """Runs and steps times `factor` (>= 2 runs with >= 1 held out, >= 2 steps); the image size is kept, as
        the attention's sequence length shapes the activations."""
        if not 0 < factor <= 1:
            raise Sd3trtError(f"--calib-scale {factor} must be in (0, 1]")
        prompts = max(2, round(self.prompts * factor))
        return CalibSettings(**{**asdict(self), "prompts": prompts, "holdout": max(1, round(prompts / 4)),
                                "steps": max(2, round(self.steps * factor))})

    def checked(self, facts) -> "CalibSettings":
        if self.prompt_texts and len(self.prompt_texts) != self.prompts:
            raise Sd3trtError(f"{len(self.prompt_texts)} calibration prompts were given for {self.prompts} runs; "
                              "give one prompt a run (or leave the run count to the prompts file)")
        if self.prompts < 2:
            raise Sd3trtError(f"--calib-prompts must be at least 2 (one to fit, one held out), got {self.prompts}")
        if not 1 <= self.holdout < self.prompts:
            raise Sd3trtError(f"the held-out runs ({self.holdout}) must be at least 1 and fewer than --calib-prompts")
        side = min(self.size, facts.max_image_side)
        side -= side % facts.pixel_multiple
        if side < facts.pixel_multiple:
            raise Sd3trtError(f"--calib-size {self.size} is smaller than {facts.pixel_multiple} px")
        return CalibSettings(**{**asdict(self), "size": side})


def read_prompts(path) -> tuple[str, ...]:
    """`--calib-prompts FILE`: one prompt a line (blank lines skipped), at least 2 (one fits, one is held out)."""
    p = Path(path)
    if not p.is_file():
        raise Sd3trtError(f"--calib-prompts {path}: no such file; give a run count or a file with one prompt a line")
    lines = tuple(line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip())
    if len(lines) < 2:
        raise Sd3trtError(f"--calib-prompts {path} has {len(lines)} prompt(s); calibration needs at least 2 (one to "
                          "fit, one held out for the gate)")
    return lines


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
        "prompt": (settings.prompt_texts or PROMPTS)[index % len(settings.prompt_texts or PROMPTS)],
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
    call_seconds: float = 0.0  # mean time of one recorded transformer call
    backend: str = ""  # what recorded it (calib_backends.Backend.describe())

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
                                                       "seconds": self.seconds, "call_seconds": self.call_seconds,
                                                       "backend": self.backend})))
        write_bytes_atomic(Path(path), buf.getvalue())

    @classmethod
    def load(cls, path: Path) -> "CalibData":
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta.get("format") != FORMAT:
                raise ValueError("old calibration format")
            return cls(z["hidden_states"], z["timestep"], z["context"], z["encoder_hidden_states"],
                       z["pooled_projections"], z["run"], meta["settings"], meta["key"],
                       float(meta.get("seconds", 0.0)), True, float(meta.get("call_seconds", 0.0)),
                       meta.get("backend", ""))


class _Recorder:
    """Wraps the transformer runner; stores what every call gets and times the calls."""

    def __init__(self, inner, sink: dict, timer):
        self.inner = inner
        self.sink = sink
        self.timer = timer

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
        t0 = time.perf_counter()
        out = self.inner.run(feeds)
        self.timer.add("record", t0)
        return out

    def close(self):
        self.inner.close()

    def __getattr__(self, name):
        return getattr(self.inner, name)


def cache_key(bundle, settings: CalibSettings, backend: str | None = None) -> str:
    """The recording's key: settings, backend (default: what auto picks here) and the bundle's files."""
    if backend is None:
        from sd3trt.engines.calib_backends import choose

        backend = choose("auto", bundle).describe()
    blob = json.dumps({"format": FORMAT, "settings": asdict(settings), "files": bundle.export_files(),
                       "scheduler": bundle.scheduler_config, "dtype": bundle.dtype, "backend": backend}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def calib_dir(bundle, cache_dir: Path | None = None) -> Path:
    """Where a bundle's recordings, ranges and gate references are kept: `cache_dir`, else <bundle>/calibration."""
    return Path(cache_dir or bundle.root / "calibration")


def recording_path(bundle, settings: CalibSettings, backend: str,
                   cache_dir: Path | None = None) -> tuple[Path, str]:
    """Where the recording of `settings` on `backend` (a Backend.describe()) is cached, and its key."""
    key = cache_key(bundle, settings, backend)
    return calib_dir(bundle, cache_dir) / f"transformer-{key[:16]}.npz", key


def collect(bundle, settings: CalibSettings = CalibSettings(), cache_dir: Path | None = None, threads: int = 0,
            log: Callable[[str], None] = print, backend=None, blocks: bool = False) -> CalibData:
    """Record the transformer's inputs over `settings.prompts` img2img runs (cached on disk), every component
    run by `backend` (a calib_backends.Backend; default: what `--calib-backend auto` picks here). blocks: the
    transformer run one block at a time and each component released after use (bounded memory; the same
    inputs recorded, so the same cache)."""
    from sd3trt.engines.calib_backends import choose
    from sd3trt.runtime.pipeline import Img2Img

    backend = backend or choose("auto", bundle, threads)
    settings = settings.checked(bundle.facts)
    path, key = recording_path(bundle, settings, backend.describe(), cache_dir)
    if path.is_file():
        try:
            data = CalibData.load(path)
            if data.key == key:
                log(f"calibration: reusing {path} ({len(data)} transformer calls)")
                return data
        except (OSError, ValueError, KeyError):
            pass  # damaged or old: record again
    sink = {"enc": [], "pooled": [], "hidden": [], "t": [], "context": [], "run": [], "current_run": 0}

    def factory(name: str):
        r = backend.runner(name, bundle.component(name), bundle.onnx_path(name), blocks)
        return _Recorder(r, sink, backend.timer) if name == "transformer" else r

    pipe = Img2Img(bundle, runner_factory=factory, threads=threads, low_memory=blocks)
    t0 = time.perf_counter()
    for i in range(settings.prompts):
        sink["current_run"] = i
        pipe(**run_inputs(settings, i))
        log(f"calibration: run {i + 1}/{settings.prompts} recorded ({len(sink['hidden'])} transformer calls)")
    data = CalibData(np.stack(sink["hidden"]), np.stack(sink["t"]), np.array(sink["context"], np.int32),
                     np.stack(sink["enc"]), np.stack(sink["pooled"]), np.array(sink["run"], np.int32),
                     asdict(settings), key, round(time.perf_counter() - t0, 1),
                     call_seconds=round(backend.timer.per_call().get("record", 0.0), 3), backend=backend.describe())
    data.save(path)
    return data


# --------------------------------------------------------------------------- activation ranges


def _measure_nodes(taps: list[str], prefix: str, reduce: bool):
    """Nodes that give each tap as a float32 output: its absolute max (reduce) or the tensor itself."""
    from onnx import TensorProto, helper

    nodes, outs = [], []
    for i, t in enumerate(taps):
        out = f"__calib_{prefix}_{i}"
        src = t
        if reduce:
            nodes.append(helper.make_node("Abs", [t], [f"{out}_abs"], name=f"__calib_Abs_{prefix}_{i}"))
            nodes.append(helper.make_node("ReduceMax", [f"{out}_abs"], [f"{out}_max"], keepdims=0,
                                          name=f"__calib_ReduceMax_{prefix}_{i}"))
            src = f"{out}_max"
        nodes.append(helper.make_node("Cast", [src], [out], to=TensorProto.FLOAT, name=f"__calib_Cast_{prefix}_{i}"))
        outs.append(out)
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


def _clip(hist: np.ndarray, amax: float, method: str, percentile: float, precision: str) -> float:
    edges = np.linspace(0.0, max(amax, 1e-12), BINS + 1)
    if method == "percentile":
        cdf = np.cumsum(hist) / max(hist.sum(), 1.0)
        k = int(np.searchsorted(cdf, percentile / 100.0))
        return float(edges[min(k + 1, BINS)])
    return _mse_clip(hist, edges, precision)


class _Feeds:
    """Each sample's inputs of the part being measured: graph inputs from the recording, the rest from the spill."""

    def __init__(self, data: CalibData, spill):
        self.data, self.spill = data, spill

    def __call__(self, sample: int, names: list[str]) -> dict:
        graph = self.data.feeds(sample)
        return {n: graph[n] if n in graph else self.spill.get(sample, n) for n in names}


def _input_dims(feeds, names: list[str], indices: list[int]) -> dict[str, list]:
    """Each input's dims as the samples show them: a dim equal in the first and the last sample is static
    (OpenVINO's CPU plugin needs ranks and reshapes it can infer), others dynamic."""
    first, last = feeds(indices[0], names), feeds(indices[-1], names)
    return {n: [a if a == b else None for a, b in zip(first[n].shape, last[n].shape)]
            if first[n].ndim == last[n].ndim else [None] * first[n].ndim for n in names}


def _whole(model):
    from sd3trt.engines.calib_blocks import Part

    g = model.graph
    inits = {i.name for i in g.initializer}
    nodes = list(g.node)
    return [Part(0, nodes, [i.name for i in g.input if i.name not in inits], [],
                 {i for n in nodes for i in n.input if i})]


def activation_ranges(onnx_path: Path, taps: list[str], data: CalibData, indices: list[int], method: str = "max",
                      percentile: float = 99.99, precision: str = "int8", threads: int = 0,
                      max_tensors_per_pass: int = 32, log: Callable[[str], None] = print, backend=None,
                      blocks: bool = False, work_dir: Path | None = None) -> dict[str, float]:
    """tensor name -> absolute range to quantize it with (see the module docstring for the methods).
    backend: a calib_backends.Backend (default ONNX Runtime CPU); blocks: measure one transformer block at a
    time, each sample's block inputs spilled to `work_dir` (calib_blocks.py), the same ranges in bounded memory."""
    import onnx

    from sd3trt.engines.calib_backends import Backend
    from sd3trt.engines.calib_blocks import Spill, cut, part_model
    from sd3trt.engines.mixed_precision import elem_types

    if method not in METHODS:
        raise Sd3trtError(f"unknown calibration method {method!r}; use {', '.join(METHODS)}")
    if not indices:
        raise Sd3trtError("no calibration inputs to measure ranges on; use more --calib-prompts")
    if not 50.0 < percentile <= 100.0:
        raise Sd3trtError(f"--percentile {percentile} must be in (50, 100]")
    onnx_path = Path(onnx_path)
    backend = backend or Backend("onnxruntime", "fp32", threads)
    model = onnx.load(str(onnx_path), load_external_data=False)
    parts = cut(model) if blocks else _whole(model)
    types = elem_types(model)
    spill = Spill(Path(tempfile.mkdtemp(dir=work_dir or onnx_path.parent, prefix=".calib-blocks-")))
    feeds = _Feeds(data, spill)
    amax, ranges, todo = dict.fromkeys(taps, 0.0), {}, list(dict.fromkeys(taps))
    try:
        for part in parts:
            mine = [t for t in todo if t in part.reads]
            todo = [t for t in todo if t not in mine]
            dims = _input_dims(feeds, part.inputs, indices)
            nodes, outs = _measure_nodes(mine, "amax", reduce=True)
            run = backend.open(part_model(model, part, outs, nodes, dims, types), onnx_path.parent,
                               part.outputs + outs)
            for i in indices:
                got = run(feeds(i, part.inputs))
                for name, value in zip(part.outputs, got):
                    spill.put(i, name, value)
                for t, v in zip(mine, got[len(part.outputs):]):
                    amax[t] = max(amax[t], float(v))
            del run
            if method != "max":
                ranges.update(_histogram_ranges(model, types, part, mine, amax, feeds, indices, backend,
                                                onnx_path.parent, dims, method, percentile, precision,
                                                max_tensors_per_pass))
            for name in part.inputs:
                if not any(name in q.inputs for q in parts[part.index + 1:]):
                    spill.drop(name)
            if len(parts) > 1:
                log(f"calibration: part {part.index + 1}/{len(parts)} measured ({len(mine)} tensors)")
    finally:
        spill.close()
    return amax if method == "max" else ranges


def _histogram_ranges(model, types, part, taps, amax, feeds, indices, backend, base_dir, dims, method, percentile,
                      precision, per_pass) -> dict[str, float]:
    """The second pass of percentile / mse: histograms of |x| over [0, amax] of each tap, `per_pass` at a time."""
    from sd3trt.engines.calib_blocks import part_model

    out = {}
    for start in range(0, len(taps), per_pass):
        group = taps[start:start + per_pass]
        nodes, outs = _measure_nodes(group, "raw", reduce=False)
        no_outputs = type(part)(part.index, part.nodes, part.inputs, [], part.reads)
        run = backend.open(part_model(model, no_outputs, outs, nodes, dims, types), base_dir, outs)
        hists = {t: np.zeros(BINS, np.float64) for t in group}
        for i in indices:
            for t, v in zip(group, run(feeds(i, part.inputs))):
                hists[t] += np.histogram(np.abs(v), bins=BINS, range=(0.0, max(amax[t], 1e-12)))[0]
        del run
        out.update({t: _clip(hists[t], amax[t], method, percentile, precision) for t in group})
    return out

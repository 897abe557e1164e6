"""The benchmark's model shapes: random-weight SD3 pipelines in diffusers format, built once into a cache.

  tiny           sd3trt.export.tiny_model (hidden 32): the quick mode and the tests
  medium-width   SD3-Medium's real layer widths (MMDiT 1536 = 24 x 64, joint 4096, pooled 2048,
                 pos-embed 192; the real SD3 VAE; CLIP-L 768/12 heads, CLIP-G 1280/20 heads, T5-XXL
                 4096/10240/64 heads) with few layers (default 2 transformer blocks, 2 layers per text
                 encoder), so it fits a small CPU machine; per-layer costs project to full depth
  sd3-medium     the full SD3-Medium architecture (24 blocks; CLIP-L 12, CLIP-G 32, T5 24 layers)
  sd3.5-large    the full SD3.5-Large architecture (38 blocks of 2432 = 38 x 64, qk RMS-norm)

The last two are tens of GB of random weights (sd3trt.export.random_model writes them in bounded memory), so
their model and bundle are bf16 by default (SD3-Medium with T5-XXL: ~16 GB, where fp32 would be twice that and
not fit a 24 GiB machine: see the README's Full size section); tiny and medium-width stay fp32. `dtype` (the
bench's --dtype) chooses. A real checkpoint is benchmarked with `--model-dir` instead. Every system of a run
reads the same model directory (diffusers) or the bundle exported from it (sd3trt), so all of them compute with
the same weights.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

from sd3trt import precision as words
from sd3trt.errors import Sd3trtError
from sd3trt.export.architectures import FULL_DEPTH, TRANSFORMERS

FULL_SHAPES = tuple(TRANSFORMERS)  # the full architectures: "sd3-medium", "sd3.5-large"
SHAPES = ("tiny", "medium-width") + FULL_SHAPES


def default_dtype(shape: str) -> str:
    """bf16 for the full architectures (what fits a 24 GiB CPU machine), fp32 for the small shapes."""
    return "bf16" if shape in FULL_SHAPES else "fp32"


@dataclass(frozen=True)
class ModelSpec:
    shape: str  # one of SHAPES
    layers: int = 2  # transformer blocks (tiny, medium-width)
    encoder_layers: int = 2  # layers of each text encoder (medium-width)
    seed: int = 0
    dtype: str = ""  # the model's and the bundle's float type; "": default_dtype(shape)

    def __post_init__(self):
        if not self.dtype:
            object.__setattr__(self, "dtype", default_dtype(self.shape))
        words.check(self.dtype, words.FLOATS, "--dtype")

    @property
    def depth(self) -> dict[str, int]:
        """Layers per depth-scaled component of the model this spec builds."""
        if self.shape in FULL_DEPTH:
            return dict(FULL_DEPTH[self.shape])
        if self.shape == "tiny":
            return {"transformer": self.layers, "clip_l": 3, "clip_g": 3, "t5": 2}
        return {"transformer": self.layers, "clip_l": self.encoder_layers, "clip_g": self.encoder_layers,
                "t5": self.encoder_layers}

    @property
    def key(self) -> str:
        if self.shape in FULL_DEPTH:
            key = f"{self.shape}-s{self.seed}"
        elif self.shape == "tiny":
            key = f"tiny-L{self.layers}-s{self.seed}"
        else:
            key = f"{self.shape}-L{self.layers}-E{self.encoder_layers}-s{self.seed}"
        return key if self.dtype == "fp32" else f"{key}-{self.dtype}"

    def with_layers(self, layers: int, encoder_layers: int) -> "ModelSpec":
        return replace(self, layers=layers, encoder_layers=encoder_layers)


def build_model(spec: ModelSpec, out: Path) -> Path:
    """Write spec's random-weight model to `out` (atomically: a temp directory renamed into place)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if spec.shape == "tiny":
        from sd3trt.export.tiny_model import TinyOptions, make_tiny

        make_tiny(out, TinyOptions(seed=spec.seed, num_layers=spec.layers), overwrite=True)
        if spec.dtype != "fp32":
            _cast_weights(out, spec.dtype)
    else:  # group by group, in bounded memory (the full architectures are tens of GB)
        from sd3trt.export.random_model import make_random

        arch = "sd3.5-large" if spec.shape == "sd3.5-large" else "sd3-medium"
        make_random(arch, out, dtype=spec.dtype, seed=spec.seed, depth=spec.depth, overwrite=True, log=lambda _s: None)
    (out / "sd3trt-bench.json").write_text(json.dumps(asdict(spec), indent=2) + "\n")
    return out


def _cast_weights(model_dir: Path, dtype: str) -> None:
    """Store the float weights of a (small) model directory in `dtype`, so every system reads the same weights."""
    import torch
    from safetensors.torch import load_file, save_file

    to = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    for f in Path(model_dir).glob("*/*.safetensors"):
        tensors = {k: t.to(to) if t.is_floating_point() else t.clone() for k, t in load_file(f).items()}
        tmp = f.with_name(f.name + ".tmp")
        save_file(tensors, tmp, metadata={"format": "pt"})
        tmp.replace(f)


def _model_ok(path: Path, spec: ModelSpec) -> bool:
    try:
        made = json.loads((path / "sd3trt-bench.json").read_text())
    except (OSError, ValueError):
        return False
    made.setdefault("dtype", "fp32")  # recorded before the bench had a dtype
    return made == json.loads(json.dumps(asdict(spec)))


def _paths(spec: ModelSpec, cache_dir: Path) -> tuple[Path, Path]:
    return Path(cache_dir) / spec.key / "model", Path(cache_dir) / spec.key / f"bundle-{spec.dtype}"


def _ready(spec: ModelSpec, cache_dir: Path) -> bool:
    from sd3trt.manifest import load_bundle

    model, bundle = _paths(spec, cache_dir)
    try:
        return _model_ok(model, spec) and load_bundle(bundle) is not None
    except Sd3trtError:
        return False


def prepare_apart(spec: ModelSpec, cache_dir: Path, log: Callable[[str], None] = print) -> tuple[Path, Path]:
    """prepare() in a child process when something must be built or exported, so that what building touched
    (GBs for the full architectures: torch, the weights) is not held by this process while the systems run."""
    if not _ready(spec, cache_dir):
        rc = subprocess.run([sys.executable, "-m", "sd3trt.benchmarks.models", json.dumps(asdict(spec)),
                             str(cache_dir)]).returncode
        if rc:
            raise Sd3trtError(f"building or exporting the {spec.key} model failed (exit code {rc}; its output is "
                              "above); fix that and run the bench again")
    return prepare(spec, cache_dir, log)


def prepare(spec: ModelSpec, cache_dir: Path, log: Callable[[str], None] = print) -> tuple[Path, Path]:
    """(model_dir, bundle_dir) for `spec`, built and exported on first use, reused afterwards."""
    from sd3trt.manifest import load_bundle

    model, bundle = _paths(spec, cache_dir)
    if not _model_ok(model, spec):
        log(f"building the {spec.key} model (random weights) in {model} ...")
        build_model(spec, model)
        shutil.rmtree(bundle, ignore_errors=True)
    try:
        load_bundle(bundle)
        log(f"using the cached {spec.key} model and bundle in {model.parent}")
    except Sd3trtError:
        from sd3trt.export.bundle import export_bundle

        log(f"exporting {model} to {bundle} (once; reused by later runs) ...")
        export_bundle(model, bundle, dtype=spec.dtype, overwrite=True, log=lambda s: log("  export " + s))
    return model, bundle


def transformer_config(model_dir: Path) -> dict:
    return json.loads((Path(model_dir) / "transformer" / "config.json").read_text())


if __name__ == "__main__":  # prepare_apart's child: python -m sd3trt.benchmarks.models SPEC_JSON CACHE_DIR
    from sd3trt.benchmarks.run import log as bench_log

    prepare(ModelSpec(**json.loads(sys.argv[1])), Path(sys.argv[2]), bench_log)

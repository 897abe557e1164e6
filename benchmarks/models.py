"""The benchmark's model shapes: random-weight SD3 pipelines in diffusers format, built once into a cache.

  tiny           sd3trt.export.tiny_model (hidden 32): the quick mode and the tests
  medium-width   SD3-Medium's real layer widths (MMDiT 1536 = 24 x 64, joint 4096, pooled 2048,
                 pos-embed 192; the real SD3 VAE; CLIP-L 768/12 heads, CLIP-G 1280/20 heads, T5-XXL
                 4096/10240/64 heads) with few layers (default 2 transformer blocks, 2 layers per text
                 encoder), so it fits a small CPU machine; per-layer costs project to full depth
  sd3-medium     the full SD3-Medium architecture (24 blocks; CLIP-L 12, CLIP-G 32, T5 24 layers)
  sd3.5-large    the full SD3.5-Large architecture (38 blocks of 2432 = 38 x 64, qk RMS-norm)

The last two are for a GPU machine (tens of GB of random weights). A real checkpoint is benchmarked with
`--model-dir` instead. Every system of a run reads the same model directory (diffusers) or the bundle
exported from it (sd3trt), so all of them compute with the same weights.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

from sd3trt.errors import Sd3trtError
from sd3trt.export.architectures import CLIP_G, CLIP_L, FULL_DEPTH, SD3_VAE, T5_XXL, TRANSFORMERS, transformer_widths

GPU_SHAPES = tuple(TRANSFORMERS)  # the full architectures: "sd3-medium", "sd3.5-large"
SHAPES = ("tiny", "medium-width") + GPU_SHAPES


@dataclass(frozen=True)
class ModelSpec:
    shape: str  # one of SHAPES
    layers: int = 2  # transformer blocks (tiny, medium-width)
    encoder_layers: int = 2  # layers of each text encoder (medium-width)
    seed: int = 0

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
            return f"{self.shape}-s{self.seed}"
        if self.shape == "tiny":
            return f"tiny-L{self.layers}-s{self.seed}"
        return f"{self.shape}-L{self.layers}-E{self.encoder_layers}-s{self.seed}"

    def with_layers(self, layers: int, encoder_layers: int) -> "ModelSpec":
        return replace(self, layers=layers, encoder_layers=encoder_layers)


def _build_pipeline(spec: ModelSpec, tokenizer_dir: Path):
    """A StableDiffusion3Img2ImgPipeline with random weights of `spec`'s architecture (tiny tokenizers)."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Img2ImgPipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast
    from transformers.utils import logging as hf_logging

    from sd3trt.export.tiny_tokenizers import write_tiny_tokenizers

    hf_logging.disable_progress_bar()
    tok = write_tiny_tokenizers(tokenizer_dir)
    depth = spec.depth

    def seeded(offset: int) -> None:
        torch.manual_seed(spec.seed * 1000 + offset)

    def clip(cfg: dict, layers: int, pad_id: int, offset: int):
        seeded(offset)
        c = CLIPTextConfig(vocab_size=tok["clip_vocab_size"], num_hidden_layers=layers, max_position_embeddings=77,
                           bos_token_id=tok["clip_bos_id"], eos_token_id=tok["clip_eos_id"], pad_token_id=pad_id, **cfg)
        return CLIPTextModelWithProjection(c).eval()

    text_encoder = clip(CLIP_L, depth["clip_l"], tok["clip_l_pad_id"], 1)
    text_encoder_2 = clip(CLIP_G, depth["clip_g"], tok["clip_g_pad_id"], 2)
    seeded(3)
    t5 = T5EncoderModel(T5Config(vocab_size=tok["t5_vocab_size"], num_layers=depth["t5"], pad_token_id=tok["t5_pad_id"],
                                 eos_token_id=tok["t5_eos_id"], decoder_start_token_id=tok["t5_pad_id"], **T5_XXL)).eval()
    seeded(4)
    arch = transformer_widths("sd3.5-large" if spec.shape == "sd3.5-large" else "sd3-medium")
    transformer = SD3Transformer2DModel(num_layers=depth["transformer"], **arch).eval()
    seeded(5)
    vae = AutoencoderKL(**SD3_VAE).eval()
    with torch.no_grad():  # random init leaves the log-variance huge; keep the posterior realistic (as tiny_model)
        vae.encoder.conv_out.weight.mul_(0.5)
    return StableDiffusion3Img2ImgPipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=text_encoder, tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir / "tokenizer"),
        text_encoder_2=text_encoder_2, tokenizer_2=CLIPTokenizer.from_pretrained(tokenizer_dir / "tokenizer_2"),
        text_encoder_3=t5, tokenizer_3=T5TokenizerFast.from_pretrained(tokenizer_dir / "tokenizer_3"),
    )


def build_model(spec: ModelSpec, out: Path) -> Path:
    """Write spec's random-weight model to `out` (atomically: a temp directory renamed into place)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if spec.shape == "tiny":
        from sd3trt.export.tiny_model import TinyOptions, make_tiny

        make_tiny(out, TinyOptions(seed=spec.seed, num_layers=spec.layers), overwrite=True)
    else:
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
            tmp = Path(tmp)
            pipe = _build_pipeline(spec, tmp / "tokenizers")
            pipe.save_pretrained(tmp / "model", safe_serialization=True)
            del pipe
            if out.exists():
                shutil.rmtree(out)
            (tmp / "model").rename(out)
    (out / "sd3trt-bench.json").write_text(json.dumps(asdict(spec), indent=2) + "\n")
    return out


def _model_ok(path: Path, spec: ModelSpec) -> bool:
    try:
        return json.loads((path / "sd3trt-bench.json").read_text()) == json.loads(json.dumps(asdict(spec)))
    except (OSError, ValueError):
        return False


def prepare(spec: ModelSpec, cache_dir: Path, log: Callable[[str], None] = print) -> tuple[Path, Path]:
    """(model_dir, bundle_dir) for `spec`, built and exported on first use, reused afterwards."""
    from sd3trt.manifest import load_bundle

    cache_dir = Path(cache_dir)
    model = cache_dir / spec.key / "model"
    bundle = cache_dir / spec.key / "bundle-fp32"
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
        export_bundle(model, bundle, dtype="fp32", overwrite=True, log=lambda s: log("  export " + s))
    return model, bundle


def transformer_config(model_dir: Path) -> dict:
    return json.loads((Path(model_dir) / "transformer" / "config.json").read_text())

"""What every stage must agree on about SD3: the model facts and one spec per exported component.

Export, engine build and runtime all read these answers, so a tensor name, an axis or a default
is written once. Plain data plus pure functions; no torch, no diffusers (the runtime imports it).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sd3trt.errors import Sd3trtError

# The released SD3 / SD3.5 models' VAE downsampling and transformer patch (a model's own: ModelFacts).
SD3_VAE_SCALE_FACTOR = 8
SD3_PATCH_SIZE = 2
SD3_PIXEL_MULTIPLE = SD3_VAE_SCALE_FACTOR * SD3_PATCH_SIZE
CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 512
T5_DEFAULT_LENGTH = 256

# Component name -> the diffusers subfolder its weights come from.
COMPONENT_SOURCES = {
    "clip_l": "text_encoder",
    "clip_g": "text_encoder_2",
    "t5": "text_encoder_3",
    "vae_encoder": "vae",
    "vae_decoder": "vae",
    "transformer": "transformer",
}
COMPONENTS = tuple(COMPONENT_SOURCES)
TOKENIZER_SOURCES = {"clip_l": "tokenizer", "clip_g": "tokenizer_2", "t5": "tokenizer_3"}
FLOAT = "float"  # placeholder dtype: the bundle's float dtype (fp32, fp16 or bf16)


@dataclass(frozen=True)
class ModelFacts:
    """The numbers the runtime needs, read once from a diffusers SD3 / SD3.5 model directory."""

    vae_scaling_factor: float
    vae_shift_factor: float
    vae_scale_factor: int
    latent_channels: int
    patch_size: int
    joint_attention_dim: int
    pooled_projection_dim: int
    pos_embed_max_size: int
    clip_l_hidden: int
    clip_g_hidden: int
    clip_l_projection: int
    clip_g_projection: int
    has_t5: bool
    t5_hidden: int
    clip_max_length: int = CLIP_MAX_LENGTH
    t5_max_length: int = T5_MAX_LENGTH
    extras: dict = field(default_factory=dict)

    @property
    def pixel_multiple(self) -> int:
        """Image sides must be a multiple of this (VAE downsampling times transformer patch)."""
        return self.vae_scale_factor * self.patch_size

    @property
    def max_image_side(self) -> int:
        """Largest image side the transformer's positional embedding covers."""
        return self.pos_embed_max_size * self.patch_size * self.vae_scale_factor

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelFacts":
        return cls(**d)


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise Sd3trtError(f"{what}: {path} is missing; is this a complete diffusers SD3 model directory?")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise Sd3trtError(f"{what}: cannot read {path} ({e}); the file is damaged, re-copy the model") from None


def read_model_index(model_dir: Path) -> dict:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise Sd3trtError(f"model directory {model_dir} does not exist; pass a local diffusers SD3 model directory")
    index = _read_json(model_dir / "model_index.json", "not a diffusers model")
    cls = index.get("_class_name", "")
    if not cls.startswith("StableDiffusion3"):
        raise Sd3trtError(
            f"{model_dir} holds a {cls or 'unknown'} model, not Stable Diffusion 3; "
            "pass a diffusers SD3 / SD3.5 model directory"
        )
    return index


def present_components(model_dir: Path) -> dict[str, bool]:
    """Which diffusers subfolders the model index declares (a null entry means 'not part of this model')."""
    index = read_model_index(model_dir)
    present = {}
    for sub in set(COMPONENT_SOURCES.values()) | set(TOKENIZER_SOURCES.values()):
        entry = index.get(sub)
        present[sub] = bool(entry) and entry[0] is not None
    return present


def read_model_facts(model_dir: Path, skip_t5: bool = False) -> ModelFacts:
    """skip_t5: treat the model as T5-less even when it declares T5 (diffusers then feeds zeros)."""
    model_dir = Path(model_dir)
    present = present_components(model_dir)
    for sub in ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        if not present[sub]:
            raise Sd3trtError(f"{model_dir} has no {sub} in model_index.json; SD3 needs it")
        if not (model_dir / sub).is_dir():
            raise Sd3trtError(f"{model_dir / sub} is missing; the model directory is incomplete")
    has_t5 = present["text_encoder_3"] and present["tokenizer_3"] and not skip_t5
    for sub in ("text_encoder_3", "tokenizer_3"):
        if has_t5 and not (model_dir / sub).is_dir():
            raise Sd3trtError(f"{model_dir / sub} is missing; restore it, or pass --skip-t5 to export without T5")
    tr = _read_json(model_dir / "transformer" / "config.json", "transformer config")
    vae = _read_json(model_dir / "vae" / "config.json", "VAE config")
    cl = _read_json(model_dir / "text_encoder" / "config.json", "CLIP-L config")
    cg = _read_json(model_dir / "text_encoder_2" / "config.json", "CLIP-G config")
    t5 = _read_json(model_dir / "text_encoder_3" / "config.json", "T5 config") if has_t5 else {}
    facts = ModelFacts(
        vae_scaling_factor=float(vae.get("scaling_factor", 1.5305)),
        vae_shift_factor=float(vae.get("shift_factor") or 0.0),
        vae_scale_factor=2 ** (len(vae["block_out_channels"]) - 1) if "block_out_channels" in vae else SD3_VAE_SCALE_FACTOR,
        latent_channels=int(vae.get("latent_channels", 16)),
        patch_size=int(tr.get("patch_size", SD3_PATCH_SIZE)),
        joint_attention_dim=int(tr.get("joint_attention_dim", 4096)),
        pooled_projection_dim=int(tr.get("pooled_projection_dim", 2048)),
        pos_embed_max_size=int(tr.get("pos_embed_max_size", 96)),
        clip_l_hidden=int(cl["hidden_size"]),
        clip_g_hidden=int(cg["hidden_size"]),
        clip_l_projection=int(cl.get("projection_dim", cl["hidden_size"])),
        clip_g_projection=int(cg.get("projection_dim", cg["hidden_size"])),
        has_t5=has_t5,
        t5_hidden=int(t5.get("d_model", tr.get("joint_attention_dim", 4096))),
        clip_max_length=CLIP_MAX_LENGTH,
        t5_max_length=T5_MAX_LENGTH,
    )
    if tr.get("in_channels", facts.latent_channels) != facts.latent_channels:
        raise Sd3trtError(
            f"transformer in_channels {tr.get('in_channels')} != VAE latent_channels {facts.latent_channels}; "
            "the model's components do not belong together"
        )
    if facts.clip_l_projection + facts.clip_g_projection != facts.pooled_projection_dim:
        raise Sd3trtError("CLIP projection sizes do not add up to the transformer's pooled_projection_dim")
    if facts.clip_l_hidden + facts.clip_g_hidden > facts.joint_attention_dim:
        raise Sd3trtError("CLIP hidden sizes exceed the transformer's joint_attention_dim")
    return facts


@dataclass(frozen=True)
class Fp32Rule:
    """Modules of a real checkpoint that overflow or lose too much in 16 bits: they stay float32 inside
    fp16/bf16 graphs and engines. Random weights cannot show this; the rules come from the field."""

    component: str
    modules: tuple[str, ...]  # module paths in the source model (fnmatch patterns)
    dtypes: tuple[str, ...]  # bundle dtypes it applies to
    config: dict  # source config entries that identify the checkpoint (empty: every model)
    upcast_by: str  # "sd3trt": export casts the module's inputs, weights and outputs; "library": the model code does
    source: str


FP32_RULES = (
    Fp32Rule("transformer", ("transformer_blocks.35",), ("fp16", "bf16"),
             {"num_layers": 38, "num_attention_heads": 38, "attention_head_dim": 64, "qk_norm": "rms_norm"}, "sd3trt",
             "NVIDIA's TensorRT demoDiffusion runs SD3.5-Large's transformer_blocks[35] in fp32 (its UpcastLayer)"),
    Fp32Rule("t5", ("encoder.block.*.layer.*.DenseReluDense.wo",), ("fp16",), {}, "library",
             "T5's feed-forward output overflows fp16: transformers keeps `wo` in fp32 (T5's _keep_in_fp32_modules) "
             "and carries the residual stream in fp32 from there"),
)


# The attribute under which each exported wrapper holds its diffusers / transformers module: the first part
# of the graph's weight names ("transformer.pos_embed...") and node scopes ("/transformer/pos_embed/...").
WRAPPED_AS = {"transformer": "transformer", "clip_l": "model", "clip_g": "model", "t5": "model",
              "vae_encoder": "vae", "vae_decoder": "vae"}


def node_scope(component: str, module: str) -> str:
    """The ONNX node-name prefix of a source module path (an fnmatch pattern stays one):
    "transformer_blocks.35" -> "/transformer/transformer_blocks.35/" (list indices stay joined by a dot)."""
    parts: list[str] = [WRAPPED_AS[component]]
    for seg in module.split("."):
        if (seg.isdigit() or seg == "*") and len(parts) > 1:
            parts[-1] += "." + seg
        else:
            parts.append(seg)
    return "/" + "/".join(parts) + "/"


def fp32_rules(model_dir: Path, component: str, dtype: str | None = None) -> tuple[Fp32Rule, ...]:
    """The rules for `component` of the model at `model_dir`: those for graphs and engines in `dtype`, or
    with dtype None, those for any dtype (an fp32 bundle records them for the 16-bit engines built from it)."""
    rules = [r for r in FP32_RULES if r.component == component and (dtype is None or dtype in r.dtypes)]
    if not any(r.config for r in rules):
        return tuple(rules)
    config = _read_json(Path(model_dir) / COMPONENT_SOURCES[component] / "config.json", f"{component} config")
    return tuple(r for r in rules if all(config.get(k) == v for k, v in r.config.items()))


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # FLOAT (the bundle's float dtype) or a fixed numpy dtype name such as "int64"
    shape: tuple  # ints and symbolic axis names

    def to_dict(self, float_dtype: str) -> dict:
        return {"name": self.name, "dtype": float_dtype if self.dtype == FLOAT else self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        axes = {}
        for t in self.inputs + self.outputs:
            named = {i: a for i, a in enumerate(t.shape) if isinstance(a, str)}
            if named:
                axes[t.name] = named
        return axes


def component_specs(facts: ModelFacts) -> dict[str, ComponentSpec]:
    """One spec per component; symbolic axes: batch, height/width (pixels), latent_height/latent_width, seq."""
    c = facts.latent_channels
    img = ("batch", 3, "height", "width")
    lat = ("batch", c, "latent_height", "latent_width")

    def clip(name: str, hidden: int, proj: int) -> ComponentSpec:
        return ComponentSpec(
            name,
            (TensorSpec("input_ids", "int64", ("batch", facts.clip_max_length)),),
            (
                TensorSpec("text_embeds", FLOAT, ("batch", proj)),
                TensorSpec("hidden_states", FLOAT, ("batch", facts.clip_max_length, hidden)),
            ),
        )

    specs = {
        "clip_l": clip("clip_l", facts.clip_l_hidden, facts.clip_l_projection),
        "clip_g": clip("clip_g", facts.clip_g_hidden, facts.clip_g_projection),
        "t5": ComponentSpec(
            "t5",
            (TensorSpec("input_ids", "int64", ("batch", "t5_seq")),),
            (TensorSpec("last_hidden_state", FLOAT, ("batch", "t5_seq", facts.t5_hidden)),),
        ),
        "vae_encoder": ComponentSpec(
            "vae_encoder",
            (TensorSpec("image", FLOAT, img),),
            (TensorSpec("mean", FLOAT, lat), TensorSpec("std", FLOAT, lat)),
        ),
        "vae_decoder": ComponentSpec(
            "vae_decoder",
            (TensorSpec("latent", FLOAT, lat),),
            (TensorSpec("image", FLOAT, img),),
        ),
        "transformer": ComponentSpec(
            "transformer",
            (
                TensorSpec("hidden_states", FLOAT, lat),
                TensorSpec("encoder_hidden_states", FLOAT, ("batch", "text_seq", facts.joint_attention_dim)),
                TensorSpec("pooled_projections", FLOAT, ("batch", facts.pooled_projection_dim)),
                # float32 even in fp16/bf16 bundles: diffusers keeps the sinusoidal projection in fp32,
                # and fp16 would round SD3's fractional timesteps by up to 0.2.
                TensorSpec("timestep", "float32", ("batch",)),
            ),
            (TensorSpec("noise_pred", FLOAT, lat),),
        ),
    }
    if not facts.has_t5:
        del specs["t5"]
    return specs


def request_dims(facts: ModelFacts, batch: int, height: int, width: int, t5_seq: int = T5_DEFAULT_LENGTH) -> dict:
    """Concrete values of the symbolic axes for one request (batch counts the CFG copies)."""
    f = facts.vae_scale_factor
    return {
        "batch": batch,
        "height": height,
        "width": width,
        "latent_height": height // f,
        "latent_width": width // f,
        "t5_seq": t5_seq,
        "text_seq": facts.clip_max_length + t5_seq,
    }


def concrete_shape(shape, dims: dict) -> tuple[int, ...]:
    return tuple(dims[a] if isinstance(a, str) else int(a) for a in shape)

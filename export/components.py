"""Torch modules with the exact inputs/outputs of each component spec, and example inputs for export."""

from __future__ import annotations

from pathlib import Path

import torch

from sd3trt.errors import Sd3trtError
from sd3trt.spec import COMPONENT_SOURCES, ModelFacts, component_specs, concrete_shape, request_dims

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class ClipWrapper(torch.nn.Module):
    """Pooled projection and the penultimate hidden state, as the SD3 pipeline uses them."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        out = self.model(input_ids, output_hidden_states=True)
        return out.text_embeds, out.hidden_states[-2]


class T5Wrapper(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids)[0]


class VaeEncoderWrapper(torch.nn.Module):
    """Posterior mean and std; the runtime draws the sample with its own (or the caller's) noise."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, image):
        dist = self.vae.encode(image).latent_dist
        return dist.mean, dist.std


class VaeDecoderWrapper(torch.nn.Module):
    """Decodes already unscaled latents ((z / scaling) + shift is done by the runtime)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent):
        return self.vae.decode(latent, return_dict=False)[0]


class TransformerWrapper(torch.nn.Module):
    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep):
        return self.transformer(
            hidden_states=hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled_projections,
            timestep=timestep,
            return_dict=False,
        )[0]


def load_source(model_dir: Path, component: str, dtype: str = "fp32"):
    """Load the diffusers/transformers module a component is exported from (fresh, eager attention)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()  # "Loading checkpoint shards" of a sharded model
    sub = Path(model_dir) / COMPONENT_SOURCES[component]
    tdtype = TORCH_DTYPES[dtype]
    try:
        if component in ("clip_l", "clip_g"):
            m = CLIPTextModelWithProjection.from_pretrained(sub, torch_dtype=tdtype, attn_implementation="eager")
        elif component == "t5":
            m = T5EncoderModel.from_pretrained(sub, torch_dtype=tdtype, attn_implementation="eager")
        elif component.startswith("vae"):
            m = AutoencoderKL.from_pretrained(sub, torch_dtype=tdtype)
        else:
            m = SD3Transformer2DModel.from_pretrained(sub, torch_dtype=tdtype)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise Sd3trtError(f"cannot load {component} from {sub}: {first}") from None
    return m.eval()


def apply_fp32_rules(component: str, source: torch.nn.Module, rules, dtype: str) -> tuple[str, ...]:
    """Keep the modules the rules name in float32 inside a 16-bit `source` (see spec.Fp32Rule); returns the
    module paths kept. "sd3trt" rules cast each module's float inputs up and its float outputs back, as
    NVIDIA's UpcastLayer does; "library" rules are checked (the model code upcasts them itself)."""
    import fnmatch

    kept = []
    low = TORCH_DTYPES[dtype]
    for rule in rules:
        matched = [(n, m) for n, m in source.named_modules() if any(fnmatch.fnmatchcase(n, p) for p in rule.modules)]
        if not matched:
            raise Sd3trtError(f"{component}: no module matches the fp32 rule {list(rule.modules)}; "
                              "the model's structure differs from the checkpoint the rule is for")
        for name, m in matched:
            if rule.upcast_by == "sd3trt":
                _upcast(m, low)
            elif any(p.dtype != torch.float32 for p in m.parameters()):
                raise Sd3trtError(f"{component}: the model library did not keep {name} in float32 ({rule.source}); "
                                  "install a transformers release that does (>= 4.45)")
            kept.append(name)
    return tuple(kept)


def _upcast(module: torch.nn.Module, low: torch.dtype) -> None:
    def up(x):
        return x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x

    def down(x):
        return x.to(low) if isinstance(x, torch.Tensor) and x.is_floating_point() else x

    module.float()
    module.register_forward_pre_hook(lambda _m, args, kwargs: (tuple(map(up, args)), {k: up(v) for k, v in kwargs.items()}),
                                     with_kwargs=True)
    module.register_forward_hook(lambda _m, _a, out: tuple(map(down, out)) if isinstance(out, tuple) else down(out))


def wrap(component: str, module) -> torch.nn.Module:
    if component in ("clip_l", "clip_g"):
        return ClipWrapper(module)
    return {
        "t5": T5Wrapper,
        "vae_encoder": VaeEncoderWrapper,
        "vae_decoder": VaeDecoderWrapper,
        "transformer": TransformerWrapper,
    }[component](module).eval()


def example_inputs(facts: ModelFacts, component: str, dtype: str, dims: dict | None = None, seed: int = 0):
    """Random inputs of the spec's shapes; export-time defaults are deliberately odd sizes (batch 2)."""
    if dims is None:
        m = facts.pixel_multiple
        dims = request_dims(facts, batch=2, height=3 * m, width=4 * m, t5_seq=13)
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in component_specs(facts)[component].inputs:
        shape = concrete_shape(t.shape, dims)
        if t.dtype == "int64":
            out.append(torch.randint(0, 100, shape, generator=g, dtype=torch.int64))
        elif t.name == "timestep":
            out.append(torch.rand(shape, generator=g) * 1000)
        else:
            out.append(torch.randn(shape, generator=g).to(TORCH_DTYPES[dtype]))
    return tuple(out)

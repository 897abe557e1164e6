"""A complete diffusers SD3 / SD3.5 model directory of a real architecture with random weights, in bounded memory.

Every component is built on the meta device (no weight memory), then materialized one group of modules at
a time (a group: the largest submodule under GROUP_BYTES, e.g. one transformer block), initialized as its
library would (transformers' `_init_weights`, PyTorch's `reset_parameters` for diffusers), written into
the current safetensors shard and released. Peak memory is about one shard plus one group, whatever the
model's size, so SD3.5-Large (8.1 B + 4.76 B T5-XXL parameters) is written on a 24 GiB machine.

The tokenizers are the project's tiny ones (no hub): their ids are valid for the full vocabularies.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from sd3trt.errors import Sd3trtError
from sd3trt.export.architectures import CLIP_G, CLIP_L, FULL_DEPTH, SD3_VAE, T5_XXL, TRANSFORMERS
from sd3trt.spec import COMPONENT_SOURCES

ARCHS = tuple(TRANSFORMERS)
GROUP_BYTES = 1 << 30  # materialize at most this much at once (one block of SD3.5-Large is ~0.3 GB in 16 bits)
SHARD_BYTES = 2 << 30  # safetensors shard size
CLIP_VOCAB, T5_VOCAB = 49408, 32128  # the real checkpoints' embedding rows
# model_index.json of the real checkpoints (the diffusers pipeline reads the classes from it).
LIBRARIES = {
    "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
    "text_encoder": ("transformers", "CLIPTextModelWithProjection"),
    "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
    "text_encoder_3": ("transformers", "T5EncoderModel"),
    "tokenizer": ("transformers", "CLIPTokenizer"),
    "tokenizer_2": ("transformers", "CLIPTokenizer"),
    "tokenizer_3": ("transformers", "T5TokenizerFast"),
    "transformer": ("diffusers", "SD3Transformer2DModel"),
    "vae": ("diffusers", "AutoencoderKL"),
}
# Scaled after initialization: random init leaves the VAE's log-variance huge; keep the posterior realistic.
SCALED = {"vae": {"encoder.conv_out.weight": 0.5}}


def depth_of(arch: str, depth: dict | None = None) -> dict:
    """Layers per depth-scaled component: the real checkpoint's unless `depth` overrides some."""
    if arch not in ARCHS:
        raise Sd3trtError(f"unknown architecture {arch!r}; use {' or '.join(ARCHS)}")
    full = dict(FULL_DEPTH[arch])
    for k, v in (depth or {}).items():
        if k not in full or int(v) < 1:
            raise Sd3trtError(f"depth {k}={v}: name one of {', '.join(full)} with at least 1 layer")
        full[k] = int(v)
    return full


def _modules(arch: str, depth: dict, tok: dict):
    """{diffusers subfolder: (module on the meta device, library)}."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    def clip(cfg: dict, layers: int, pad_id: int):
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=CLIP_VOCAB, num_hidden_layers=layers, max_position_embeddings=77, bos_token_id=tok["clip_bos_id"],
            eos_token_id=tok["clip_eos_id"], pad_token_id=pad_id, **cfg))

    with init_empty_weights(include_buffers=False), torch.no_grad():  # buffers (positions) are computed for real
        modules = {
            "text_encoder": (clip(CLIP_L, depth["clip_l"], tok["clip_l_pad_id"]), "transformers"),
            "text_encoder_2": (clip(CLIP_G, depth["clip_g"], tok["clip_g_pad_id"]), "transformers"),
            "text_encoder_3": (T5EncoderModel(T5Config(
                vocab_size=T5_VOCAB, num_layers=depth["t5"], pad_token_id=tok["t5_pad_id"], eos_token_id=tok["t5_eos_id"],
                decoder_start_token_id=tok["t5_pad_id"], **T5_XXL)), "transformers"),
            "transformer": (SD3Transformer2DModel(**{**TRANSFORMERS[arch], "num_layers": depth["transformer"]}),
                            "diffusers"),
            "vae": (AutoencoderKL(**SD3_VAE), "diffusers"),
        }
    for model, library in modules.values():
        if library == "transformers":
            model.tie_weights()  # T5's embedding is one tensor under two names (meta init leaves them apart)
    return modules


def _nbytes(module, recurse: bool = True) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters(recurse=recurse))


def _groups(model) -> list[tuple[str, list]]:
    """(prefix, modules) pairs covering every parameter once: each largest submodule under GROUP_BYTES with
    all its modules, and each larger module alone for its own direct parameters and buffers."""
    out = []

    def walk(prefix: str, m) -> None:
        if _nbytes(m) <= GROUP_BYTES:
            out.append((prefix, [(n, sub) for n, sub in m.named_modules(prefix=prefix)]))
            return
        if any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False)):
            out.append((prefix, [(prefix, m)]))
        for name, child in m.named_children():
            walk(f"{prefix}.{name}" if prefix else name, child)

    walk("", model)
    return out


def _init_diffusers(m) -> None:
    """What constructing the module on the CPU does: PyTorch's default init; norm scales 1 and biases 0."""
    import torch

    if hasattr(m, "reset_parameters") and any(True for _ in m.parameters(recurse=False)):
        m.reset_parameters()
        return
    for name, p in m.named_parameters(recurse=False):
        if name == "bias":
            torch.nn.init.zeros_(p)
        elif name == "weight" and p.ndim == 1:
            torch.nn.init.ones_(p)
        else:
            torch.nn.init.normal_(p, std=0.02)


def _materialize(m, dtype) -> None:
    import torch

    for name, p in list(m.named_parameters(recurse=False)):
        if p.is_meta:
            setattr(m, name, torch.nn.Parameter(torch.empty(p.shape, dtype=dtype), requires_grad=False))


def _release(m) -> None:
    import torch

    for name, p in list(m.named_parameters(recurse=False)):
        setattr(m, name, torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=False))


class _ShardWriter:
    """Tensors in, safetensors shards out, named and indexed as diffusers / transformers save them."""

    def __init__(self, folder: Path, stem: str):
        self.folder, self.stem = folder, stem
        self.pending: dict = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []

    def add(self, name: str, tensor) -> None:
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += tensor.numel() * tensor.element_size()
        if self.pending_bytes >= SHARD_BYTES:
            self.flush()

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        save_file(self.pending, str(self.folder / f".shard-{len(self.shards)}"), metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> int:
        self.flush()
        n, total, weight_map = len(self.shards), 0, {}
        for i, names in enumerate(self.shards):
            final = f"{self.stem}.safetensors" if n == 1 else f"{self.stem}-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.folder / f".shard-{i}", self.folder / final)
            total += (self.folder / final).stat().st_size
            weight_map.update({name: final for name in names})
        if n > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.folder / f"{self.stem}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return total


def _write_component(sub: str, model, library: str, folder: Path, dtype) -> int:
    """Materialize, initialize and save `model` group by group; returns the bytes written."""
    import torch

    folder.mkdir(parents=True)
    init = model._init_weights if library == "transformers" else _init_diffusers
    scaled = SCALED.get(sub, {})
    # Tied parameters (T5's shared embedding) are saved once, under their first name, as save_pretrained does.
    every_param = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    saved = {n for n, _ in model.named_parameters()} | (set(model.state_dict(keep_vars=True)) - every_param)
    writer = _ShardWriter(folder, "model" if library == "transformers" else "diffusion_pytorch_model")
    with torch.no_grad():
        for _, mods in _groups(model):
            for _, m in mods:
                _materialize(m, dtype)
            for _, m in mods:
                init(m)
            for mod_name, m in mods:
                for pname, p in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
                    full = f"{mod_name}.{pname}" if mod_name else pname
                    if full in saved:
                        writer.add(full, p.mul_(scaled[full]) if full in scaled else p.detach())
            for _, m in mods:
                _release(m)  # the writer holds what is not yet on disk
    size = writer.close()
    if library == "transformers":
        model.config.dtype = dtype
        model.config.save_pretrained(folder)
    else:
        model.save_config(folder)
    return size


def make_random(
    arch: str, out: Path, dtype: str = "bf16", seed: int = 0, depth: dict | None = None, overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Write a random-weight diffusers model directory of `arch` to `out` (atomically: a temp dir renamed)."""
    import time

    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTokenizer, T5TokenizerFast
    from transformers.utils import logging as hf_logging

    from sd3trt.export.components import TORCH_DTYPES
    from sd3trt.export.tiny_tokenizers import write_tiny_tokenizers
    from sd3trt import precision as words

    words.check(dtype, words.FLOATS, "--dtype")
    layers = depth_of(arch, depth)
    out = Path(out)
    if out.exists() and not overwrite:
        raise Sd3trtError(f"{out} already exists; choose another --out or pass --overwrite")
    hf_logging.disable_progress_bar()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        model_dir = Path(tmp) / "model"
        tok = write_tiny_tokenizers(model_dir)
        for sub, cls in (("tokenizer", CLIPTokenizer), ("tokenizer_2", CLIPTokenizer), ("tokenizer_3", T5TokenizerFast)):
            cls.from_pretrained(model_dir / sub)  # written loadable
        FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(model_dir / "scheduler")
        for offset, (sub, (model, library)) in enumerate(_modules(arch, layers, tok).items(), 1):
            torch.manual_seed(seed * 1000 + offset)
            t0 = time.perf_counter()
            size = _write_component(sub, model, library, model_dir / sub, TORCH_DTYPES[dtype])
            log(f"{sub}: {size / 2**30:.2f} GiB in {time.perf_counter() - t0:.0f} s")
            del model
        import diffusers

        index = {"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": diffusers.__version__,
                 **{sub: list(lib) for sub, lib in LIBRARIES.items()}}
        (model_dir / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        for path in [model_dir, *model_dir.rglob("*")]:  # temp directories and shards are private by default
            path.chmod(0o755 if path.is_dir() else 0o644)
        if out.exists():
            shutil.rmtree(out)
        model_dir.rename(out)
    return out


assert set(LIBRARIES) >= set(COMPONENT_SOURCES.values())

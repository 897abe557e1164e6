"""A complete random-weight SD3 img2img model in diffusers format, built locally (no hub).

Same architecture families as the real checkpoints (MMDiT, 16-channel VAE, CLIP-L, CLIP-G, T5),
at widths small enough that the whole test suite stays fast. Deterministic for a given seed.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sd3trt.errors import Sd3trtError


@dataclass(frozen=True)
class TinyOptions:
    seed: int = 0
    patch_size: int = 2
    latent_channels: int = 16
    num_layers: int = 2
    sd35: bool = False  # SD3.5 style: qk_norm="rms_norm" and dual-attention layers
    with_t5: bool = True
    pos_embed_max_size: int = 32  # largest image side = 32 * patch * 8 px
    head_dim: int = 8  # attention head dim (4 heads); 16 or more lets FP8 quantize attention
    vae_levels: int = 4  # VAE resolution levels (3: downsampling by 4, as in the issue-14 SD3.5-style model)


def _seeded(seed: int, offset: int):
    import torch

    torch.manual_seed(seed * 1000 + offset)


def build_tiny_pipeline(opts: TinyOptions, tokenizer_dir: Path):
    """The pipeline object with random weights; tokenizers are read from tokenizer_dir."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Img2ImgPipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel

    from transformers.utils import logging as hf_logging

    from sd3trt.export.tiny_tokenizers import write_tiny_tokenizers

    hf_logging.disable_progress_bar()

    if opts.num_layers < 1:
        raise Sd3trtError("--layers must be at least 1")
    if opts.patch_size not in (1, 2, 4):
        raise Sd3trtError(f"--patch-size {opts.patch_size} is not supported; use 1, 2 or 4")
    if opts.vae_levels not in (2, 3, 4):
        raise Sd3trtError(f"vae_levels {opts.vae_levels} is not supported; use 2, 3 or 4")
    if opts.head_dim < 1:
        raise Sd3trtError("head_dim must be at least 1")
    if opts.latent_channels < 1:
        raise Sd3trtError("--latent-channels must be at least 1")

    tok = write_tiny_tokenizers(tokenizer_dir)
    clip_l_hidden, clip_g_hidden, proj, t5_hidden = 32, 40, 32, 96

    def clip(hidden: int, pad_id: int, act: str, offset: int):
        _seeded(opts.seed, offset)
        cfg = CLIPTextConfig(
            vocab_size=tok["clip_vocab_size"],
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=3,
            num_attention_heads=4,
            projection_dim=proj,
            max_position_embeddings=77,
            hidden_act=act,
            bos_token_id=tok["clip_bos_id"],
            eos_token_id=tok["clip_eos_id"],
            pad_token_id=pad_id,
        )
        return CLIPTextModelWithProjection(cfg).eval()

    text_encoder = clip(clip_l_hidden, tok["clip_l_pad_id"], "quick_gelu", 1)
    text_encoder_2 = clip(clip_g_hidden, tok["clip_g_pad_id"], "gelu", 2)
    text_encoder_3 = None
    if opts.with_t5:
        _seeded(opts.seed, 3)
        t5cfg = T5Config(
            vocab_size=tok["t5_vocab_size"],
            d_model=t5_hidden,
            d_kv=16,
            d_ff=128,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",
            pad_token_id=tok["t5_pad_id"],
            eos_token_id=tok["t5_eos_id"],
            decoder_start_token_id=tok["t5_pad_id"],
        )
        text_encoder_3 = T5EncoderModel(t5cfg).eval()

    _seeded(opts.seed, 4)
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=opts.patch_size,
        in_channels=opts.latent_channels,
        out_channels=opts.latent_channels,
        num_layers=opts.num_layers,
        attention_head_dim=opts.head_dim,
        num_attention_heads=4,
        joint_attention_dim=t5_hidden,
        caption_projection_dim=4 * opts.head_dim,  # the inner width (4 heads)
        pooled_projection_dim=2 * proj,
        pos_embed_max_size=opts.pos_embed_max_size,
        qk_norm="rms_norm" if opts.sd35 else None,
        dual_attention_layers=(0,) if opts.sd35 else (),
    ).eval()
    _seeded(opts.seed, 5)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * opts.vae_levels,
        up_block_types=("UpDecoderBlock2D",) * opts.vae_levels,
        block_out_channels=(8, 16, 16, 16)[:opts.vae_levels],
        layers_per_block=1,
        latent_channels=opts.latent_channels,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()
    with torch.no_grad():  # random init leaves the VAE's log-variance huge; keep the posterior realistic
        vae.encoder.conv_out.weight.mul_(0.5)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return StableDiffusion3Img2ImgPipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir / "tokenizer"),
        text_encoder_2=text_encoder_2,
        tokenizer_2=CLIPTokenizer.from_pretrained(tokenizer_dir / "tokenizer_2"),
        text_encoder_3=text_encoder_3,
        tokenizer_3=_t5_tokenizer(tokenizer_dir) if opts.with_t5 else None,
    )


def _t5_tokenizer(tokenizer_dir: Path):
    from transformers import T5TokenizerFast

    return T5TokenizerFast.from_pretrained(tokenizer_dir / "tokenizer_3")


def make_tiny(out: Path, opts: TinyOptions = TinyOptions(), overwrite: bool = False) -> Path:
    """Write the tiny model to `out` (atomically: a temp directory renamed into place)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise Sd3trtError(f"{out} already exists; choose another --out or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        tmp = Path(tmp)
        pipe = build_tiny_pipeline(opts, tmp / "tokenizers")
        pipe.save_pretrained(tmp / "model", safe_serialization=True)
        if out.exists():
            shutil.rmtree(out)
        (tmp / "model").rename(out)
    return out

"""Real SD3 / SD3.5 transformer architectures (configs only; weights are random here, no hub)."""

from __future__ import annotations

from pathlib import Path

TRANSFORMERS = {
    # stabilityai/stable-diffusion-3-medium-diffusers: 2.0 B parameters
    "sd3-medium": dict(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
        pos_embed_max_size=192,
    ),
    # stabilityai/stable-diffusion-3.5-large: 8.1 B parameters, qk RMS-norm
    "sd3.5-large": dict(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38, attention_head_dim=64,
        num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048,
        pos_embed_max_size=192, qk_norm="rms_norm",
    ),
}


def write_random_transformer(arch: str, model_dir: Path, dtype: str = "fp32", seed: int = 0) -> Path:
    """A diffusers model directory holding only `transformer/` with random weights of a real architecture."""
    import torch
    from diffusers import SD3Transformer2DModel

    from sd3trt.export.components import TORCH_DTYPES

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(TORCH_DTYPES[dtype])  # initialise in the target dtype: 8 B params in fp32 is 32 GB
    try:
        model = SD3Transformer2DModel(**TRANSFORMERS[arch]).eval()
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(Path(model_dir) / "transformer", safe_serialization=True)
    return Path(model_dir)

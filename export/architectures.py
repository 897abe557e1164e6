"""Real SD3 / SD3.5 architectures: the one table of their configs (weights are random here, no hub).

`sd3trt make-random` (export/random_model.py) writes random-weight models from it, at full depth or the same
widths with fewer layers, for the full-size tests and the benchmark's model shapes.
"""

from __future__ import annotations

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

# The text encoders and the VAE (SD3-Medium and SD3.5-Large share them).
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, projection_dim=768, hidden_act="quick_gelu")
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, projection_dim=1280, hidden_act="gelu")
T5_XXL = dict(d_model=4096, d_ff=10240, num_heads=64, d_kv=64, relative_attention_num_buckets=32,
              relative_attention_max_distance=128, feed_forward_proj="gated-gelu")
SD3_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16, norm_num_groups=32,
    sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
)
TEXT_ENCODER_DEPTH = {"clip_l": 12, "clip_g": 32, "t5": 24}
# Layers of each depth-scaled component of the real checkpoints.
FULL_DEPTH = {arch: {"transformer": cfg["num_layers"], **TEXT_ENCODER_DEPTH} for arch, cfg in TRANSFORMERS.items()}

"""Analytic FLOP count of one SD3 / SD3.5 MMDiT forward pass (diffusers SD3Transformer2DModel).

Counts matrix products only (a multiply-add is 2 FLOPs): the linear layers, the patch-embedding
convolution and the two attention products (Q K^T and softmax V). Norms, activations, softmax, RoPE-free
position adds and the residual/gating elementwise ops are left out; they are well under 1% of the total
at SD3 sizes and run at memory speed, not matmul speed. Layer structure (diffusers 0.3x-0.4x):

  pos_embed          Conv(C -> D, kernel p, stride p) over the latent        2 N_img (C p^2) D
  time_text_embed    timestep MLP 256->D->D and pooled-text MLP P->D->D       2 (256 D + D^2 + P D + D^2)
  context_embedder   Linear(J -> D) over the text tokens                      2 N_txt J D
  per block          adaLN-Zero modulations: image D->6D (9D with dual attention), text D->6D
                     (D->2D, AdaLayerNormContinuous, in the last block: context_pre_only)
                     Q, K, V of both streams (3 D^2 per token), joint attention over N = N_img + N_txt
                     tokens (2 N^2 D for Q K^T + 2 N^2 D for P V, all heads together), output projections
                     (image always, text except in the last block), MLPs D->4D->D (8 D^2 per token; the
                     text MLP is absent in the last block); dual-attention blocks (SD3.5 Medium) add a
                     second self-attention over the image tokens only.
  norm_out, proj_out AdaLayerNormContinuous D->2D, Linear(D -> p^2 C_out)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MMDiTShape:
    hidden: int  # D = heads * head_dim (= caption_projection_dim in every SD3 checkpoint)
    layers: int
    joint_attention_dim: int = 4096  # J
    pooled_projection_dim: int = 2048  # P
    patch_size: int = 2
    in_channels: int = 16
    out_channels: int = 16
    dual_attention_layers: tuple = ()
    time_proj_dim: int = 256

    @classmethod
    def from_config(cls, cfg: dict) -> "MMDiTShape":
        """From a diffusers transformer/config.json."""
        hidden = int(cfg["num_attention_heads"]) * int(cfg["attention_head_dim"])
        cap = int(cfg.get("caption_projection_dim", hidden))
        if cap != hidden:
            raise ValueError(f"caption_projection_dim {cap} != heads x head_dim {hidden}; not an SD3 layout")
        return cls(
            hidden=hidden,
            layers=int(cfg["num_layers"]),
            joint_attention_dim=int(cfg["joint_attention_dim"]),
            pooled_projection_dim=int(cfg["pooled_projection_dim"]),
            patch_size=int(cfg["patch_size"]),
            in_channels=int(cfg["in_channels"]),
            out_channels=int(cfg.get("out_channels") or cfg["in_channels"]),
            dual_attention_layers=tuple(cfg.get("dual_attention_layers") or ()),
        )


def mmdit_flops(shape: MMDiTShape, latent_h: int, latent_w: int, text_seq: int, batch: int = 1) -> dict:
    """FLOPs of one transformer call on `batch` samples, by part, with 'total'."""
    d, p = shape.hidden, shape.patch_size
    n_img = (latent_h // p) * (latent_w // p)
    n_txt = text_seq
    n = n_img + n_txt
    parts = {
        "patch_embed": 2 * n_img * shape.in_channels * p * p * d,
        "conditioning": 2 * (shape.time_proj_dim * d + d * d + shape.pooled_projection_dim * d + d * d),
        "context_embedder": 2 * n_txt * shape.joint_attention_dim * d,
        "adaln": 0,
        "qkv_out_proj": 0,
        "attention": 0,
        "mlp": 0,
        "final": 2 * d * 2 * d + 2 * n_img * d * p * p * shape.out_channels,
    }
    for i in range(shape.layers):
        last = i == shape.layers - 1
        dual = i in shape.dual_attention_layers
        parts["adaln"] += 2 * d * (9 if dual else 6) * d + 2 * d * (2 if last else 6) * d
        parts["qkv_out_proj"] += 2 * 3 * d * d * (n_img + n_txt)  # Q, K, V of both streams
        parts["qkv_out_proj"] += 2 * d * d * n_img + (0 if last else 2 * d * d * n_txt)  # output projections
        parts["attention"] += 4 * n * n * d  # Q K^T and P V over the joint sequence
        parts["mlp"] += 2 * 8 * d * d * (n_img + (0 if last else n_txt))
        if dual:
            parts["qkv_out_proj"] += 2 * 4 * d * d * n_img
            parts["attention"] += 4 * n_img * n_img * d
    out = {k: v * batch for k, v in parts.items()}
    out["total"] = sum(out.values())
    return out


def transformer_call_flops(transformer_config: dict, latent_h: int, latent_w: int, text_seq: int, batch: int) -> dict:
    return mmdit_flops(MMDiTShape.from_config(transformer_config), latent_h, latent_w, text_seq, batch)


def layer_shapes(transformer_config: dict, latent_h: int, latent_w: int, text_seq: int, batch: int) -> list[list[int]]:
    """[M, K, N] of the transformer's dominant products over the joint sequence: QKV/out projections (D x D)
    and the MLP (D x 4D, 4D x D), M = batch x (image + text tokens). The peak measurement times these."""
    sh = MMDiTShape.from_config(transformer_config)
    m = batch * (latent_h // sh.patch_size * (latent_w // sh.patch_size) + text_seq)
    d = sh.hidden
    return [[m, d, d], [m, d, 4 * d], [m, 4 * d, d]]

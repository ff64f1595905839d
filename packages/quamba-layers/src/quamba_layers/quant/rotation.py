"""Hadamard rotation of a float Mamba-1 model (QuaRot-style, as upstream Quamba does).

The residual stream is rotated by an orthonormal Hadamard matrix Q (d_model): ``r' = r @ Q``.
RMSNorm is invariant under the rotation once its weight g is folded into the next linear layer:
- embedding rows: ``E' = E @ Q``;
- in_proj (norm weight folded): ``W_in' = W_in diag(g) Q``;
- lm_head (norm_f weight folded): ``W_lm' = W_lm diag(g_f) Q``;
- out_proj, behind the online Hadamard H (d_inner, applied to the SSM output as ``y_h = H y``):
  ``W_out' = Q^T W_out H^T`` so that ``W_out' (H y)`` rotated back equals ``W_out y`` rotated.
All products in float64. Without Hadamard (naive recipe) Q = H = I and only the norms are folded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from quamba_layers.hadamard import hadamard_matrix, supported_hadamard_size


@dataclass
class RotatedLayer:
    in_proj: torch.Tensor  # (2E, D)
    conv_weight: torch.Tensor  # (E, K)
    conv_bias: torch.Tensor  # (E,)
    x_proj: torch.Tensor  # (R+2N, E)
    dt_proj: torch.Tensor  # (E, R)
    dt_bias: torch.Tensor  # (E,)
    A_log: torch.Tensor  # (E, N)
    D: torch.Tensor  # (E,)
    out_proj: torch.Tensor  # (D, E)


@dataclass
class RotatedModel:
    embedding: torch.Tensor  # (V, D)
    lm_head: torch.Tensor  # (V, D)
    layers: list[RotatedLayer]
    eps: float
    online_hadamard: bool

    def online_matrix(self, d_inner: int) -> torch.Tensor:
        """The orthonormal online transform H applied as ``y_h = y @ H^T`` (float64)."""
        if not self.online_hadamard:
            return torch.eye(d_inner, dtype=torch.float64)
        return hadamard_matrix(d_inner, dtype=torch.float64) / math.sqrt(d_inner)


def orthonormal_hadamard(n: int) -> torch.Tensor:
    if not supported_hadamard_size(n):
        raise ValueError(
            f"no Hadamard matrix for size {n}: supported sizes are 2^k, 12*2^k and 40*2^k "
            "(e.g. 768, 1536, 2048, 2560, 4096, 5120); quantize with hadamard=False instead"
        )
    return hadamard_matrix(n, dtype=torch.float64) / math.sqrt(n)


@torch.no_grad()
def rotate_model(model, hadamard: bool = True) -> RotatedModel:
    """Fold norms and (optionally) apply the Hadamard rotation to ``model`` (a MambaLM)."""
    cfg = model.config
    d_model = cfg.d_model
    d_inner = cfg.d_inner
    f64 = torch.float64
    q = orthonormal_hadamard(d_model) if hadamard else torch.eye(d_model, dtype=f64)
    if hadamard:
        orthonormal_hadamard(d_inner)  # fail early, with the message, for the online size too
    h_inner = (
        hadamard_matrix(d_inner, dtype=f64) / math.sqrt(d_inner)
        if hadamard
        else torch.eye(d_inner, dtype=f64)
    )
    backbone = model.backbone
    embedding = backbone.embedding.weight.to(f64) @ q
    g_f = backbone.norm_f.weight.to(f64)
    lm_head = (model.lm_head.weight.to(f64) * g_f[None, :]) @ q
    layers = []
    for block in backbone.layers:
        mixer = block.mixer
        g = block.norm.weight.to(f64)
        w_in = (mixer.in_proj.weight.to(f64) * g[None, :]) @ q
        w_out = q.t() @ mixer.out_proj.weight.to(f64) @ h_inner.t()
        conv_bias = mixer.conv1d.bias
        layers.append(
            RotatedLayer(
                in_proj=w_in,
                conv_weight=mixer.conv1d.weight.to(f64).reshape(d_inner, -1),
                conv_bias=(
                    conv_bias.to(f64) if conv_bias is not None else torch.zeros(d_inner, dtype=f64)
                ),
                x_proj=mixer.x_proj.weight.to(f64),
                dt_proj=mixer.dt_proj.weight.to(f64),
                dt_bias=mixer.dt_proj.bias.to(f64),
                A_log=mixer.A_log.to(f64),
                D=mixer.D.to(f64),
                out_proj=w_out,
            )
        )
    return RotatedModel(
        embedding=embedding,
        lm_head=lm_head,
        layers=layers,
        eps=cfg.rms_norm_eps,
        online_hadamard=hadamard,
    )

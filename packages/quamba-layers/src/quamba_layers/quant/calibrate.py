"""Calibration: run the rotated float model over the calibration set and observe every site.

Sites (names as upstream's hooks): in_proj:input (norm output, s_in), in_proj:output (s_xz),
x_proj:input (conv+SiLU output = SSM u, s_u, percentile), x_proj:output (s_xo), dt_proj:output
without bias (s_dt), out_proj:input (after the online Hadamard, s_had), ssm_state (final state of
each sample, s_h, percentile). Samples run one at a time (batch 1), in the given order, in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from quamba_layers import reference_ops as ops
from quamba_layers.quant.observers import MinMaxObserver, PercentileObserver
from quamba_layers.quant.recipe import QuantRecipe
from quamba_layers.quant.rotation import RotatedModel

ACTIVATION_SITES = ("s_in", "s_xz", "s_u", "s_xo", "s_dt", "s_had", "s_h")
PERCENTILE_SITES = ("s_u", "s_h")


def make_observers(recipe: QuantRecipe, n_layer: int) -> list[dict]:
    layers = []
    for _ in range(n_layer):
        observers = {}
        for site in ACTIVATION_SITES:
            if site in PERCENTILE_SITES and recipe.percentile_alpha is not None:
                observers[site] = PercentileObserver(recipe.percentile_alpha, recipe.momentum)
            else:
                observers[site] = MinMaxObserver()
        layers.append(observers)
    return layers


def _causal_conv_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    k = weight.shape[-1]
    out = F.conv1d(x, weight[:, None, :], bias, padding=k - 1, groups=x.shape[1])[
        ..., : x.shape[-1]
    ]
    return out * torch.sigmoid(out)


@torch.no_grad()
def calibrate(
    rotated: RotatedModel,
    samples: torch.Tensor,
    recipe: QuantRecipe,
    *,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> list[dict]:
    """Observe every site over ``samples`` (S, L) token ids.

    Returns (per-layer observers, the lm_head:input observer).
    """
    device = torch.device(device)
    f32 = torch.float32
    layers = [
        {name: getattr(layer, name).to(device, f32) for name in layer.__dataclass_fields__}
        for layer in rotated.layers
    ]
    embedding = rotated.embedding.to(device, f32)
    d_inner = layers[0]["conv_weight"].shape[0]
    h_online_t = rotated.online_matrix(d_inner).t().to(device, f32)
    ones = torch.ones(embedding.shape[1], device=device, dtype=f32)
    observers = make_observers(recipe, len(layers))
    lm_head_observer = MinMaxObserver()  # lm_head:input, used when the lm_head is quantized
    iterator = tqdm(samples, desc="calibrating", unit="sample", disable=not progress)
    for ids in iterator:
        residual = embedding[ids.to(device)][None]  # (1, L, D)
        for weights, obs in zip(layers, observers):
            normed, _ = ops.rmsnorm(residual, None, ones, rotated.eps, None)
            obs["s_in"].update(normed)
            xz = normed @ weights["in_proj"].t()
            obs["s_xz"].update(xz)
            x, z = xz[..., :d_inner].transpose(1, 2), xz[..., d_inner:].transpose(1, 2)
            u = _causal_conv_silu(x, weights["conv_weight"], weights["conv_bias"])
            obs["s_u"].update(u)
            xdbl = u.transpose(1, 2) @ weights["x_proj"].t()
            obs["s_xo"].update(xdbl)
            rank = weights["dt_proj"].shape[1]
            n_state = (xdbl.shape[-1] - rank) // 2
            dt = xdbl[..., :rank] @ weights["dt_proj"].t()
            obs["s_dt"].update(dt)
            b = xdbl[..., rank : rank + n_state].transpose(1, 2)
            c = xdbl[..., rank + n_state :].transpose(1, 2)
            y, h_last = ops.selective_scan(
                u.contiguous(),
                dt.transpose(1, 2).contiguous(),
                -torch.exp(weights["A_log"]),
                b.contiguous(),
                c.contiguous(),
                weights["D"],
                z.contiguous(),
                weights["dt_bias"],
            )
            obs["s_h"].update(h_last)
            y_h = y @ h_online_t
            obs["s_had"].update(y_h)
            residual = residual + y_h @ weights["out_proj"].t()
        if recipe.quantize_lm_head:
            final, _ = ops.rmsnorm(residual, None, ones, rotated.eps, None)
            lm_head_observer.update(final)
    return observers, lm_head_observer

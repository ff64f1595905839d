"""The FP Mamba-1 language model in pure PyTorch (CPU or CUDA; float32, float16 or bfloat16).

Module names and parameter shapes follow mamba_ssm's `MambaLMHeadModel`, so `state_dict()` keys
are exactly that layout (`backbone.embedding.weight`, `backbone.layers.{i}.mixer.in_proj.weight`,
..., `backbone.norm_f.weight`, `lm_head.weight`). The mixer is split into small stage methods
(`project_in`, `conv`, `project_x`, `project_dt`, `scan`, `gate`, `project_out`) that a quantized
mixer and the stage probes mirror.

Decode state, per layer: `(conv_state (B, E, K - 1) in the model dtype, ssm_state (B, E, N)
float32)`. Arithmetic of the conv and the scan is float32 (`quamba_layers.fp_ops`); the residual
stream is float32 when `residual_in_fp32`.

`MambaLM.use_kernels()` switches the norms, convs and scans to the quamba-kernels float kernels
(`quamba_layers.fp_kernels`, which states the semantics and tolerances); the default is the
reference path everywhere. `generate` decodes through a CUDA graph (`quamba_layers.cuda_graph`)
when the kernel path is active.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import fp_kernels
from .config import MambaConfig
from .cuda_graph import GraphedStep
from .fp_ops import (
    causal_conv1d_ref,
    causal_conv1d_update_ref,
    selective_scan_ref,
    selective_state_update_ref,
    silu_ref,
)

__all__ = ["Block", "LMOutput", "MambaBackbone", "MambaLM", "MambaMixer", "MambaState", "RMSNorm"]

# One (conv_state, ssm_state) pair per layer.
MambaState = list[tuple[torch.Tensor, torch.Tensor]]

_MODEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class LMOutput:
    """Output of `MambaLM.forward`: float32 logits (B, L, padded_vocab) and the state after L."""

    logits: torch.Tensor
    state: MambaState | None = None


class RMSNorm(nn.Module):
    """RMSNorm computed in float32: `(x * rsqrt(mean(x^2) + eps)) * weight`, output in weight dtype."""

    # The kernel implementation (fp_kernels.FloatKernelOps) set by MambaLM.use_kernels, or None.
    kernel_ops: fp_kernels.FloatKernelOps | None = None

    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel_ops is not None:
            return self.kernel_ops.rmsnorm(self, x)
        x32 = x.float()
        mean_square = x32.pow(2).mean(-1, keepdim=True)
        y = (x32 * torch.rsqrt(mean_square + self.eps)) * self.weight.float()
        return y.to(self.weight.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class MambaMixer(nn.Module):
    """The Mamba-1 selective-SSM mixer (mamba_ssm's `Mamba`), split into stages.

    Parameters: in_proj (2E, D), conv1d depthwise (E, 1, K), x_proj (R + 2N, E),
    dt_proj (E, R) with bias, A_log (E, N), D (E,), out_proj (D, E).
    """

    # The kernel implementation (fp_kernels.FloatKernelOps) set by MambaLM.use_kernels, or None.
    kernel_ops: fp_kernels.FloatKernelOps | None = None

    def __init__(self, config: MambaConfig) -> None:
        super().__init__()
        self.config = config
        d_model, d_inner = config.d_model, config.d_inner
        self.d_inner = d_inner
        self.d_state = config.d_state
        self.d_conv = config.d_conv
        self.dt_rank = config.resolved_dt_rank
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=config.bias)
        self.conv1d = nn.Conv1d(
            d_inner,
            d_inner,
            kernel_size=config.d_conv,
            groups=d_inner,
            padding=config.d_conv - 1,
            bias=config.conv_bias,
        )
        self.x_proj = nn.Linear(d_inner, self.dt_rank + 2 * config.d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(d_inner, config.d_state))
        self.D = nn.Parameter(torch.empty(d_inner))
        self.out_proj = nn.Linear(d_inner, d_model, bias=config.bias)

    # --- stages -----------------------------------------------------------------------------

    def project_in(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """in_proj: hidden (B, L, D) -> x, z, each (B, E, L) in the model dtype."""
        xz = self.in_proj(hidden).transpose(1, 2)
        x, z = xz.chunk(2, dim=1)
        return x, z

    def conv(
        self, x: torch.Tensor, conv_state: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Causal depthwise conv + SiLU: x (B, E, L) -> u (B, E, L), and the new conv state."""
        return causal_conv1d_ref(
            x,
            self.conv1d.weight[:, 0, :],
            self.conv1d.bias,
            activation="silu",
            conv_state=conv_state,
            return_final_state=True,
        )

    def conv_step(
        self, x: torch.Tensor, conv_state: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode step of `conv`: x (B, E) -> u (B, E), and the new conv state."""
        return causal_conv1d_update_ref(
            x, conv_state, self.conv1d.weight[:, 0, :], self.conv1d.bias, activation="silu"
        )

    def project_x(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x_proj: u (B, E, L) -> dt_low (B, L, R), B (B, N, L), C (B, N, L)."""
        x_dbl = F.linear(u.transpose(1, 2), self.x_proj.weight)
        dt_low, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        return dt_low, B.transpose(1, 2), C.transpose(1, 2)

    def project_dt(self, dt_low: torch.Tensor) -> torch.Tensor:
        """dt_proj without its bias: dt_low (B, L, R) -> delta_raw (B, E, L).

        The bias is added inside the scan (delta_bias), before the softplus, as in mamba_ssm.
        """
        return F.linear(dt_low, self.dt_proj.weight).transpose(1, 2)

    def scan(
        self,
        u: torch.Tensor,
        delta_raw: torch.Tensor,
        B: torch.Tensor,
        C: torch.Tensor,
        ssm_state: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Selective scan with the D skip, before the gate: -> y (B, L, E) float32, last state."""
        return selective_scan_ref(
            u,
            delta_raw,
            self.A(),
            B,
            C,
            D=self.D,
            z=None,
            delta_bias=self.dt_proj.bias,
            delta_softplus=True,
            return_last_state=True,
            initial_state=ssm_state,
        )

    def scan_step(
        self,
        u: torch.Tensor,
        delta_raw: torch.Tensor,
        B: torch.Tensor,
        C: torch.Tensor,
        ssm_state: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode step of `scan`: u, delta_raw (B, E), B, C (B, N) -> y (B, E), new state."""
        return selective_state_update_ref(
            ssm_state,
            u,
            delta_raw,
            self.A(),
            B,
            C,
            D=self.D,
            z=None,
            dt_bias=self.dt_proj.bias,
            dt_softplus=True,
        )

    def gate(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """y (B, L, E) float32 times silu(z), z (B, E, L) -> (B, L, E) float32."""
        return y * silu_ref(z.float()).transpose(1, 2)

    def project_out(self, y: torch.Tensor) -> torch.Tensor:
        """out_proj: y (B, L, E) -> (B, L, D) in the model dtype."""
        return self.out_proj(y.to(self.out_proj.weight.dtype))

    def A(self) -> torch.Tensor:
        """The (negative) state matrix A = -exp(A_log), float32 (E, N)."""
        return -torch.exp(self.A_log.float())

    # --- full passes --------------------------------------------------------------------------

    def forward(
        self,
        hidden: torch.Tensor,
        state: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """hidden (B, L, D) -> (out (B, L, D), (conv_state, ssm_state) after the last position)."""
        if self.kernel_ops is not None:
            return self.kernel_ops.mixer_forward(self, hidden, state)
        conv_state, ssm_state = state if state is not None else (None, None)
        x, z = self.project_in(hidden)
        u, conv_state = self.conv(x, conv_state)
        dt_low, B, C = self.project_x(u)
        delta_raw = self.project_dt(dt_low)
        y, ssm_state = self.scan(u, delta_raw, B, C, ssm_state)
        y = self.gate(y, z)
        return self.project_out(y), (conv_state, ssm_state)

    def step(
        self, hidden: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """One decode token: hidden (B, D) -> (out (B, D), new (conv_state, ssm_state))."""
        if self.kernel_ops is not None:
            return self.kernel_ops.mixer_step(self, hidden, state)
        conv_state, ssm_state = state
        x, z = self.project_in(hidden[:, None, :])
        u, conv_state = self.conv_step(x[..., 0], conv_state)
        dt_low, B, C = self.project_x(u[..., None])
        delta_raw = self.project_dt(dt_low)
        y, ssm_state = self.scan_step(u, delta_raw[..., 0], B[..., 0], C[..., 0], ssm_state)
        y = self.gate(y[:, None, :], z)
        return self.project_out(y)[:, 0], (conv_state, ssm_state)


class Block(nn.Module):
    """Pre-norm residual block (mamba_ssm order): residual += hidden; hidden = mixer(norm(residual))."""

    def __init__(self, config: MambaConfig) -> None:
        super().__init__()
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = RMSNorm(config.d_model, eps=config.rms_norm_eps)
        self.mixer = MambaMixer(config)

    def add_residual(self, hidden: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """The residual stream after this block's input is added (float32 if residual_in_fp32)."""
        residual = hidden if residual is None else residual + hidden
        return residual.float() if self.residual_in_fp32 else residual

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        state: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """(hidden, residual) (B, L, D) -> (mixer output, residual, new layer state)."""
        residual = self.add_residual(hidden, residual)
        hidden, state = self.mixer(self.norm(residual), state)
        return hidden, residual, state

    def step(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        state: tuple[torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """`forward` for one decode token: hidden, residual (B, D)."""
        residual = self.add_residual(hidden, residual)
        hidden, state = self.mixer.step(self.norm(residual), state)
        return hidden, residual, state


class MambaBackbone(nn.Module):
    """Embedding, the blocks and the final norm (mamba_ssm's `MixerModel`)."""

    def __init__(self, config: MambaConfig) -> None:
        super().__init__()
        # An explicit (uninitialised) weight skips nn.Embedding's normal_ init, which on the
        # meta device costs a one-off import of PyTorch's Python decompositions (seconds).
        weight = torch.empty(config.padded_vocab_size, config.d_model)
        self.embedding = nn.Embedding(config.padded_vocab_size, config.d_model, _weight=weight)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm_f = RMSNorm(config.d_model, eps=config.rms_norm_eps)

    def forward(
        self, input_ids: torch.Tensor, state: MambaState | None = None
    ) -> tuple[torch.Tensor, MambaState]:
        """input_ids (B, L) -> (normalised hidden states (B, L, D), state after L)."""
        hidden = self.embedding(input_ids)
        residual = None
        new_state: MambaState = []
        for index, layer in enumerate(self.layers):
            layer_state = state[index] if state is not None else None
            hidden, residual, layer_state = layer(hidden, residual, layer_state)
            new_state.append(layer_state)
        residual = residual + hidden
        return self.norm_f(residual), new_state

    def step(self, token_ids: torch.Tensor, state: MambaState) -> tuple[torch.Tensor, MambaState]:
        """token_ids (B,) -> (normalised hidden (B, D), new state)."""
        hidden = self.embedding(token_ids)
        residual = None
        new_state: MambaState = []
        for layer, layer_state in zip(self.layers, state):
            hidden, residual, layer_state = layer.step(hidden, residual, layer_state)
            new_state.append(layer_state)
        residual = residual + hidden
        return self.norm_f(residual), new_state


class MambaLM(nn.Module):
    """Mamba-1 language model (mamba_ssm `MambaLMHeadModel` layout), tied or untied lm_head.

    `MambaLM(config, seed=0)` builds random weights initialised like mamba_ssm (A_log = log(1..N),
    dt bias = softplus^-1 of dt in [1e-3, 1e-1], D = 1, normal weights with the variance of the
    default nn.Linear init, out_proj scaled by 1/sqrt(n_layer)). `device="meta"` allocates nothing
    (for shapes, or for `load_state_dict(..., assign=True)`).

    Ops run as the PyTorch references until `use_kernels()` selects the CUDA kernels;
    `implementations()` records what runs each op.
    """

    kernel_choice: fp_kernels.KernelChoice = fp_kernels.DEFAULT_CHOICE

    def __init__(
        self,
        config: MambaConfig,
        seed: int | None = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if not isinstance(config, MambaConfig):
            raise TypeError(f"config must be a MambaConfig, got {type(config).__name__}")
        if dtype not in _MODEL_DTYPES:
            raise ValueError(f"dtype must be one of {_MODEL_DTYPES}, got {dtype!r}")
        self.config = config
        on_meta = device is not None and torch.device(device).type == "meta"
        # Random weights are drawn on the CPU (the same values whatever the target device).
        with torch.device("meta" if on_meta else "cpu"):
            self.backbone = MambaBackbone(config)
        # A tied head's own weight is replaced at once: don't allocate and initialise it.
        head_device = "meta" if on_meta or config.tie_embeddings else "cpu"
        self.lm_head = nn.Linear(
            config.d_model, config.padded_vocab_size, bias=False, device=head_device
        )
        self.tie_weights()
        if not on_meta:
            self.init_weights(seed)
            self.to(device=device)
        self.to(dtype=dtype)

    # --- weights ------------------------------------------------------------------------------

    def tie_weights(self) -> None:
        """Share the embedding matrix with lm_head when the config asks for tied embeddings."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight

    @torch.no_grad()
    def init_weights(self, seed: int | None = 0) -> None:
        """Re-initialise every parameter, mamba_ssm-like, from a CPU generator seeded with `seed`."""
        generator = torch.Generator()
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
        config = self.config

        def normal_(param: torch.Tensor, std: float) -> None:
            values = torch.randn(param.shape, generator=generator) * std
            param.copy_(values)

        def uniform_(param: torch.Tensor, low: float, high: float) -> None:
            values = torch.rand(param.shape, generator=generator) * (high - low) + low
            param.copy_(values)

        def linear_std(fan_in: int) -> float:
            # Same variance as PyTorch's default nn.Linear init, which mamba_ssm keeps.
            return 1.0 / math.sqrt(3.0 * fan_in)

        normal_(self.backbone.embedding.weight, 0.02)
        if not config.tie_embeddings:
            normal_(self.lm_head.weight, 0.02)
        dt_min, dt_max, dt_floor = 1e-3, 1e-1, 1e-4
        for layer in self.backbone.layers:
            mixer = layer.mixer
            layer.norm.weight.fill_(1.0)
            normal_(mixer.in_proj.weight, linear_std(config.d_model))
            normal_(mixer.conv1d.weight, linear_std(config.d_conv))
            if mixer.conv1d.bias is not None:
                normal_(mixer.conv1d.bias, linear_std(config.d_conv))
            normal_(mixer.x_proj.weight, linear_std(config.d_inner))
            dt_init_std = mixer.dt_rank**-0.5
            uniform_(mixer.dt_proj.weight, -dt_init_std, dt_init_std)
            log_dt = torch.rand(config.d_inner, generator=generator) * (
                math.log(dt_max) - math.log(dt_min)
            ) + math.log(dt_min)
            dt = torch.exp(log_dt).clamp(min=dt_floor)
            # softplus^-1(dt) = dt + log(1 - exp(-dt)), so that softplus(bias) = dt.
            mixer.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            A = torch.arange(1, config.d_state + 1, dtype=torch.float32)
            mixer.A_log.copy_(torch.log(A).expand(config.d_inner, -1))
            mixer.D.fill_(1.0)
            normal_(mixer.out_proj.weight, linear_std(config.d_inner) / math.sqrt(config.n_layer))
            for linear in (mixer.in_proj, mixer.out_proj):
                if linear.bias is not None:
                    linear.bias.zero_()
        self.backbone.norm_f.weight.fill_(1.0)

    @property
    def device(self) -> torch.device:
        return self.backbone.embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.backbone.embedding.weight.dtype

    # --- implementation -----------------------------------------------------------------------

    def use_kernels(self, prefer: str = "auto", *, exact_scan: bool = False) -> MambaLM:
        """Choose who runs the norms, convs and scans; returns the model.

        prefer: "auto" (the quamba-kernels float kernels when the model is on CUDA and they can
        run, else the reference), "kernel" (RuntimeError with the reason when they cannot run),
        "reference" (the PyTorch ops, the default). `exact_scan=True` makes the float16/bfloat16
        scan bit-identical to the reference (slower); see `quamba_layers.fp_kernels` for the
        semantics and tolerances. The kernels are for inference (no autograd). Call it again
        after moving the model to another device.
        """
        fp_kernels.use_kernels(self, prefer, exact_scan=exact_scan)
        return self

    def implementations(self) -> dict[str, str]:
        """What runs each op (reference or kernel), the request and the reason of the choice."""
        return fp_kernels.implementations(self)

    # --- inference ----------------------------------------------------------------------------

    def init_state(self, batch_size: int) -> MambaState:
        """Zero decode state for `batch_size` sequences: per layer (conv_state, ssm_state)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        config = self.config
        state: MambaState = []
        for _ in range(config.n_layer):
            conv_state = torch.zeros(
                batch_size, config.d_inner, config.d_conv - 1, device=self.device, dtype=self.dtype
            )
            ssm_state = torch.zeros(
                batch_size, config.d_inner, config.d_state, device=self.device, dtype=torch.float32
            )
            state.append((conv_state, ssm_state))
        return state

    def forward(self, input_ids: torch.Tensor, state: MambaState | None = None) -> LMOutput:
        """input_ids (B, L) -> LMOutput(logits (B, L, padded_vocab) float32, state after L).

        With `state` (from `init_state`, `step` or an earlier `forward`) the sequence continues
        from it, as if the earlier tokens were prepended.
        """
        self._check_token_ids(input_ids, expected_dim=2)
        if state is not None:
            self._check_state(state, input_ids.shape[0])
        hidden, new_state = self.backbone(input_ids, state)
        return LMOutput(logits=self.lm_head(hidden).float(), state=new_state)

    def step(
        self, token_ids: torch.Tensor, state: MambaState | None = None
    ) -> tuple[torch.Tensor, MambaState]:
        """Decode one token per sequence: token_ids (B,) -> (logits (B, padded_vocab) float32,
        new state). `state=None` starts from `init_state`. The given state is not modified."""
        self._check_token_ids(token_ids, expected_dim=1)
        if state is None:
            state = self.init_state(token_ids.shape[0])
        else:
            self._check_state(state, token_ids.shape[0])
        return self.step_unchecked(token_ids, state)

    def step_unchecked(
        self, token_ids: torch.Tensor, state: MambaState
    ) -> tuple[torch.Tensor, MambaState]:
        """`step` without the argument checks (they synchronise with the GPU): the step function
        that `GraphedStep` captures. token_ids (B,) and state must be valid."""
        hidden, new_state = self.backbone.step(token_ids, state)
        return self.lm_head(hidden).float(), new_state

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        eos_token_id: int | None = None,
        cuda_graph: bool | None = None,
    ) -> torch.Tensor:
        """Continue `input_ids` (B, L) by up to `max_new_tokens` tokens; returns (B, L + new).

        `temperature=0` is greedy (argmax). Otherwise tokens are sampled from
        softmax(logits / temperature), optionally restricted to the `top_k` most likely and to
        the smallest set whose probability reaches `top_p`. Sampling runs on the CPU with a
        `torch.Generator` seeded by `seed`, so a seed gives the same tokens on every run. Only
        ids below `config.vocab_size` are produced (the padding rows are never chosen). With
        `eos_token_id`, a finished sequence is padded with it and generation stops once every
        sequence has finished.

        `cuda_graph`: decode through a CUDA graph (`GraphedStep`, captured once per call; the
        same tokens as eager decoding). None: on CUDA when the kernel path is active.
        """
        self._check_token_ids(input_ids, expected_dim=2)
        _check_generation_args(max_new_tokens, temperature, top_k, top_p, seed)
        if cuda_graph is None:
            cuda_graph = self.device.type == "cuda" and self.kernel_choice.ops is not None
        elif not isinstance(cuda_graph, bool):
            raise TypeError(f"cuda_graph must be None or a bool, got {cuda_graph!r}")
        elif cuda_graph and self.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs a model on a CUDA device, not {self.device}")
        generator = None
        if temperature > 0:
            generator = torch.Generator()
            if seed is None:
                generator.seed()
            else:
                generator.manual_seed(seed)
        tokens = input_ids
        if max_new_tokens == 0:
            return tokens
        output = self.forward(input_ids)
        logits, state = output.logits[:, -1], output.state
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        graphed: GraphedStep | None = None
        for index in range(max_new_tokens):
            next_tokens = _select_next_tokens(
                logits[:, : self.config.vocab_size], temperature, top_k, top_p, generator
            ).to(input_ids.device, input_ids.dtype)
            if eos_token_id is not None:
                next_tokens = torch.where(finished, eos_token_id, next_tokens)
                finished = finished | (next_tokens == eos_token_id)
            tokens = torch.cat([tokens, next_tokens[:, None]], dim=1)
            last = index == max_new_tokens - 1
            if last or (eos_token_id is not None and bool(finished.all())):
                break
            if not cuda_graph:
                logits, state = self.step(next_tokens, state)
                continue
            if graphed is None:
                graphed = GraphedStep(self.step_unchecked, next_tokens, state)
            logits = graphed(next_tokens)
        return tokens

    # --- argument checks ----------------------------------------------------------------------

    def _check_token_ids(self, token_ids: torch.Tensor, expected_dim: int) -> None:
        shape_name = "(batch, seqlen)" if expected_dim == 2 else "(batch,)"
        if not isinstance(token_ids, torch.Tensor):
            raise TypeError(
                f"token ids must be a torch.Tensor {shape_name}, got {type(token_ids).__name__}"
            )
        if token_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"token ids must be int64 or int32, got {token_ids.dtype}")
        if token_ids.dim() != expected_dim:
            raise ValueError(
                f"token ids must have shape {shape_name}, got {tuple(token_ids.shape)}"
            )
        if token_ids.numel() == 0:
            raise ValueError(f"token ids must not be empty, got shape {tuple(token_ids.shape)}")
        if token_ids.device != self.device:
            raise ValueError(
                f"token ids are on {token_ids.device} but the model is on {self.device}"
            )
        low, high = int(token_ids.min()), int(token_ids.max())
        vocab = self.config.padded_vocab_size
        if low < 0 or high >= vocab:
            raise ValueError(f"token ids must be in [0, {vocab}), got values in [{low}, {high}]")

    def _check_state(self, state: MambaState, batch_size: int) -> None:
        config = self.config
        if not isinstance(state, list | tuple) or len(state) != config.n_layer:
            raise ValueError(
                f"state must be a list of {config.n_layer} (conv_state, ssm_state) pairs "
                "(see init_state)"
            )
        conv_shape = (batch_size, config.d_inner, config.d_conv - 1)
        ssm_shape = (batch_size, config.d_inner, config.d_state)
        for index, layer_state in enumerate(state):
            if not isinstance(layer_state, list | tuple) or len(layer_state) != 2:
                raise ValueError(f"state[{index}] must be a (conv_state, ssm_state) pair")
            conv_state, ssm_state = layer_state
            for name, tensor, shape in (
                ("conv_state", conv_state, conv_shape),
                ("ssm_state", ssm_state, ssm_shape),
            ):
                if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape:
                    found = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else tensor
                    raise ValueError(f"state[{index}] {name} must have shape {shape}, got {found}")


def _check_generation_args(
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    seed: int | None,
) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
        raise TypeError(f"max_new_tokens must be an int, got {max_new_tokens!r}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not isinstance(temperature, int | float) or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, int | float) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be None or an int, got {seed!r}")


def _select_next_tokens(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Greedy (temperature 0) or seeded sampling over logits (B, V); returns int64 (B,)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    scores = logits.detach().float().cpu() / temperature
    if top_k is not None and top_k < scores.shape[-1]:
        kth_best = torch.topk(scores, top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth_best, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        sorted_probs = torch.softmax(sorted_scores, dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p (the best stays).
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]

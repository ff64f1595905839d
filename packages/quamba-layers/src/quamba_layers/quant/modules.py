"""The W8A8 Mamba-1 model (Quamba1) whose every quantized op is a call into ``reference_ops``
(or, on CUDA with quamba-kernels, the kernel of the same semantics).

Tensor data attributes (all buffers, saved in checkpoints):
- int8 weights in (out_features, in_features) layout: ``in_proj_weight`` (2E, D), ``x_proj_weight``
  (R+2N, E), ``dt_proj_weight`` (E, R), ``out_proj_weight`` (D, E); ``conv_weight`` (E, K),
  ``conv_bias`` (E); ``A_log`` (E, N), ``D`` (E), ``dt_bias`` (E);
- float32 0-d scales: weight scales ``s_w_in, s_w_x, s_w_dt, s_w_out, s_w_conv, s_b_conv, s_A, s_D,
  s_dtb`` and activation scales ``s_in`` (norm out), ``s_xz`` (in_proj out), ``s_u`` (conv out),
  ``s_xo`` (x_proj out), ``s_dt`` (dt_proj out), ``s_had`` (Hadamard out), ``s_h`` (SSM state).
Activations between in_proj and the scan are sequence-last (B, E, L).

What each stage does is set by a :class:`~quamba_layers.datapath.Datapath` (the precision mode);
the layers never look at mode names.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch
from torch import nn

from quamba_layers import reference_ops as ops
from quamba_layers.datapath import Datapath
from quamba_layers.quant.backends import Backend, reference_backend

SCALE_NAMES = (
    "s_in",
    "s_xz",
    "s_u",
    "s_xo",
    "s_dt",
    "s_had",
    "s_h",
    "s_w_in",
    "s_w_x",
    "s_w_dt",
    "s_w_out",
    "s_w_conv",
    "s_b_conv",
    "s_A",
    "s_D",
    "s_dtb",
)


@dataclass(frozen=True)
class QuantizedConfig:
    """Shape and structure of a W8A8 model (the float model's config plus quantization facts)."""

    d_model: int
    n_layer: int
    vocab_size: int
    padded_vocab_size: int
    d_inner: int
    d_state: int
    d_conv: int
    dt_rank: int
    rms_norm_eps: float
    online_hadamard: bool
    # Upstream's "head-to-toe" options: "fp16" (Quamba1 default) or "int8" (per-row scales for the
    # embedding; static W8A8 with an INT8 final norm for lm_head).
    embedding: str = "fp16"
    lm_head: str = "fp16"
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("embedding", "lm_head"):
            if getattr(self, name) not in ("fp16", "int8"):
                raise ValueError(f"{name} must be 'fp16' or 'int8', got {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        return {
            "d_model": self.d_model,
            "n_layer": self.n_layer,
            "vocab_size": self.vocab_size,
            "padded_vocab_size": self.padded_vocab_size,
            "d_inner": self.d_inner,
            "d_state": self.d_state,
            "d_conv": self.d_conv,
            "dt_rank": self.dt_rank,
            "rms_norm_eps": self.rms_norm_eps,
            "online_hadamard": self.online_hadamard,
            "embedding": self.embedding,
            "lm_head": self.lm_head,
        }

    @classmethod
    def from_dict(cls, data: dict) -> QuantizedConfig:
        keys = cls.__dataclass_fields__.keys() - {"extra"}
        data = {"embedding": "fp16", "lm_head": "fp16", **data}
        missing = sorted(k for k in keys if k not in data)
        if missing:
            raise ValueError(f"quantized model config lacks {missing}")
        return cls(**{k: data[k] for k in keys})


# Upstream Quamba1 (mode 0): INT8 conv output and INT8 scan. quamba_modes sets the others.
DEFAULT_DATAPATH = Datapath(conv_output="int8", ssm_input="int8", ssm_impl="kernel_int8")


def _scale_buffer() -> torch.Tensor:
    # Placeholder until calibration or a checkpoint fills it; NaN makes a forgotten scale fail loudly.
    return torch.tensor(float("nan"), dtype=torch.float32)


class W8A8Mixer(nn.Module):
    """Quantized Mamba-1 mixer: int8 in (B, L, D), float16 out (B, L, D)."""

    def __init__(self, cfg: QuantizedConfig) -> None:
        super().__init__()
        e, d, n, r, k = cfg.d_inner, cfg.d_model, cfg.d_state, cfg.dt_rank, cfg.d_conv
        self.cfg = cfg
        i8 = torch.int8
        self.register_buffer("in_proj_weight", torch.zeros(2 * e, d, dtype=i8))
        self.register_buffer("conv_weight", torch.zeros(e, k, dtype=i8))
        self.register_buffer("conv_bias", torch.zeros(e, dtype=i8))
        self.register_buffer("x_proj_weight", torch.zeros(r + 2 * n, e, dtype=i8))
        self.register_buffer("dt_proj_weight", torch.zeros(e, r, dtype=i8))
        self.register_buffer("A_log", torch.zeros(e, n, dtype=i8))
        self.register_buffer("D", torch.zeros(e, dtype=i8))
        self.register_buffer("dt_bias", torch.zeros(e, dtype=i8))
        self.register_buffer("out_proj_weight", torch.zeros(d, e, dtype=i8))
        for name in SCALE_NAMES:
            self.register_buffer(name, _scale_buffer())
        self.datapath = DEFAULT_DATAPATH
        self.backend: Backend = reference_backend()
        self._scales: dict[str, float] | None = None
        self.probe = None  # callable(stage_name, tensor) set by stage probes
        self.capture_state = False  # prefill for decoding: keep the final conv/SSM state
        self.last_state: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- scales -------------------------------------------------------------------------------
    def scales(self) -> dict[str, float]:
        """Scales as Python floats (exact float32 values), validated once and cached."""
        if self._scales is None:
            values = {name: float(getattr(self, name)) for name in SCALE_NAMES}
            bad = {k: v for k, v in values.items() if not (v > 0.0 and math.isfinite(v))}
            if bad:
                raise ValueError(
                    "invalid quantization scales (each must be finite and > 0): "
                    + ", ".join(f"{k}={v}" for k, v in sorted(bad.items()))
                )
            self._scales = values
        return self._scales

    def invalidate_scales(self) -> None:
        self._scales = None

    def _load_from_state_dict(self, *args, **kwargs):
        self._scales = None
        return super()._load_from_state_dict(*args, **kwargs)

    def _probe(self, stage: str, value: torch.Tensor) -> None:
        if self.probe is not None:
            self.probe(stage, value)

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x_q: torch.Tensor, seq_lens: torch.Tensor | None = None) -> torch.Tensor:
        s = self.scales()
        dp = self.datapath
        rnd = dp.rounding
        e = self.cfg.d_inner

        # in_proj (INT8 GEMM) -> x, z, sequence-last
        if dp.conv_input == "int8_static":
            x_q_conv, z_q = self._in_proj_halves(x_q, s["s_xz"], rnd.gemm)
            s_conv_in: float | torch.Tensor = s["s_xz"]
            z = ops.dequantize(z_q, s["s_xz"]) if dp.gate == "fp32" else None
        else:  # int8_dynamic (mode 3): FP in_proj output, per-sequence dynamic scale
            x_fp, z = self._in_proj_halves(x_q, None, rnd.gemm)
            z_q = None
            x_q_conv, s_conv_in = self.backend.quantize_per_sequence_dynamic(
                x_fp, seq_lens, rnd.requant
            )
        self._probe("conv_in", x_q_conv)

        # causal conv1d + SiLU
        conv_args = (
            s_conv_in,
            self.conv_weight,
            s["s_w_conv"],
            self.conv_bias,
            s["s_b_conv"],
        )
        # Prefill for decoding: the conv also writes its state (the last K-1 input codes).
        conv_state = None
        if self.capture_state and x_q_conv.dtype == torch.int8:
            conv_state = x_q_conv.new_empty(*x_q_conv.shape[:2], self.cfg.d_conv - 1)
        if dp.conv_output == "fp32":
            v = self.backend.conv1d_int8(x_q_conv, *conv_args, None, rnd.conv, conv_state)
            u_codes = None
            self._probe("conv_out", v)
        else:
            u_codes = self.backend.conv1d_int8(x_q_conv, *conv_args, s["s_u"], rnd.conv, conv_state)
            v = ops.dequantize(u_codes, s["s_u"]) if dp.conv_output == "fp32_grid" else None
            self._probe("conv_out", v if v is not None else u_codes)

        # x_proj input: INT8 codes (the conv's, or Q8 of the float conv output)
        if u_codes is not None:
            xproj_in = u_codes
        else:
            xproj_in = self.backend.quantize_int8(v, s["s_u"], rnd.requant)
        self._probe("x_proj_in", xproj_in)

        # x_proj, dt_proj (INT8 GEMMs)
        dtr_q, b_q, c_q = self.backend.x_proj(
            xproj_in, self.x_proj_weight, s["s_u"], s["s_w_x"], s["s_xo"], rnd.gemm,
            self.cfg.dt_rank,
        )  # fmt: skip
        dt_q = self.backend.w8a8_linear(
            dtr_q, self.dt_proj_weight, s["s_xo"], s["s_w_dt"], s["s_dt"], rnd.gemm,
            layout="seq_last",
        )  # fmt: skip

        # SSM input u
        if dp.ssm_input == "int8":
            u_in = u_codes
        elif dp.ssm_input == "fp32_grid":
            u_in = v if v is not None else ops.dequantize(u_codes, s["s_u"])
        elif dp.ssm_input == "requant_int8":
            if u_codes is None:  # x_proj already got Q8(v, s_u, requant) of this very v
                u_in = xproj_in
            else:
                source = v if v is not None else ops.dequantize(u_codes, s["s_u"])
                u_in = self.backend.quantize_int8(source, s["s_u"], rnd.requant)
        else:  # fp32 (true, unclipped)
            u_in = v
        self._probe("ssm_in", u_in)

        y, h_last = self._scan(u_in, dt_q, b_q, c_q, z_q, z)
        self._probe("ssm_out", y)
        if self.capture_state:
            self.last_state = self._prefill_state(x_q_conv, conv_state, h_last, seq_lens)

        # online Hadamard -> INT8, out_proj -> FP16
        if self.cfg.online_hadamard:
            yh_q = self.backend.hadamard(y, 1.0 / math.sqrt(e), s["s_had"], rnd.hadamard)
        else:
            yh_q = self.backend.quantize_int8(y.float(), s["s_had"], rnd.hadamard)
        self._probe("out_proj_in", yh_q)
        out = self.backend.w8a8_linear(
            yh_q, self.out_proj_weight, s["s_had"], s["s_w_out"], None, rnd.gemm, torch.float16
        )
        self._probe("out_proj_out", out)
        return out

    def _prefill_state(self, x_q_conv, conv_state, h_last, seq_lens):
        """INT8 decode state after a prefill: the last K-1 conv input codes (``conv_state``, written
        by the conv), Q8(h_last, s_h)."""
        if seq_lens is not None and bool((seq_lens != x_q_conv.shape[-1]).any()):
            raise ValueError(
                "decoding after a padded prefill is not supported: prefill equal lengths"
            )
        if x_q_conv.dtype != torch.int8:
            raise ValueError("decoding needs INT8 conv inputs")
        if h_last.dtype == torch.int8:
            ssm_state = h_last
        else:
            s_h = self.scales()["s_h"]
            ssm_state = ops.quantize_int8(h_last, s_h, self.datapath.rounding.ssm_state)
        return conv_state, ssm_state

    @torch.no_grad()
    def step(self, x_q_t: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor):
        """One decode token: int8 (B, D) in, float16 (B, D) out, and the INT8 states, which are
        updated in place (so that the step can be captured in a CUDA graph).

        The conv state holds INT8 input codes; the SSM state is INT8 on grid s_h, requantized after
        every step (upstream's decode semantics). Prefill keeps the state in float32 instead, so
        decode drifts slightly from prefill (see the package README).
        """
        s = self.scales()
        dp = self.datapath
        rnd = dp.rounding
        if dp.conv_input != "int8_static" or dp.gate != "int8":
            raise ValueError(
                "token-by-token decoding needs static INT8 conv input and gate (modes other than 3)"
            )
        e, r, n = self.cfg.d_inner, self.cfg.dt_rank, self.cfg.d_state
        xz_q = self.backend.w8a8_linear(
            x_q_t, self.in_proj_weight, s["s_in"], s["s_w_in"], s["s_xz"], rnd.gemm
        )
        # Column ranges, not copies: the decode kernels read rows that are apart in memory.
        x_t, z_t = xz_q[:, :e], xz_q[:, e:]
        conv_out_scale = None if dp.conv_output == "fp32" else s["s_u"]
        conv_out, conv_state = self.backend.conv1d_int8_update(
            x_t, conv_state, s["s_xz"], self.conv_weight, s["s_w_conv"], self.conv_bias,
            s["s_b_conv"], conv_out_scale, rnd.conv,
        )  # fmt: skip
        if conv_out.dtype == torch.int8:
            u_codes, v = conv_out, None
        else:
            u_codes, v = None, conv_out
        xproj_in = (
            u_codes if u_codes is not None else self.backend.quantize_int8(v, s["s_u"], rnd.requant)
        )
        xdbl_q = self.backend.w8a8_linear(
            xproj_in, self.x_proj_weight, s["s_u"], s["s_w_x"], s["s_xo"], rnd.gemm
        )
        # dt_proj's GEMM (input: the first r columns of xdbl_q) runs inside the scan step.
        dt_from = (xdbl_q, self.dt_proj_weight, s["s_xo"], s["s_w_dt"], rnd.gemm)
        b_q, c_q = xdbl_q[:, r : r + n], xdbl_q[:, r + n :]
        if dp.ssm_input == "int8":
            u_in = u_codes
        elif dp.ssm_input == "fp32_grid":
            u_in = ops.dequantize(u_codes, s["s_u"])
        elif dp.ssm_input == "requant_int8":
            if u_codes is None:  # the same Q8(v, s_u, requant) as x_proj's input
                u_in = xproj_in
            else:
                source = v if v is not None else ops.dequantize(u_codes, s["s_u"])
                u_in = self.backend.quantize_int8(source, s["s_u"], rnd.requant)
        else:
            u_in = v
        y, ssm_state = self.backend.selective_scan_step_dt_proj(
            ssm_state, u_in, s["s_u"], dt_from, s["s_dt"], self.A_log, s["s_A"], b_q, s["s_xo"],
            c_q, s["s_xo"], self.D, s["s_D"], z_t, s["s_xz"], self.dt_bias, s["s_dtb"], s["s_h"],
            state_rounding=rnd.ssm_state,
        )  # fmt: skip
        if self.cfg.online_hadamard:
            yh_q = self.backend.hadamard(y, 1.0 / math.sqrt(e), s["s_had"], rnd.hadamard)
        else:
            yh_q = self.backend.quantize_int8(y.float(), s["s_had"], rnd.hadamard)
        out = self.backend.w8a8_linear(
            yh_q, self.out_proj_weight, s["s_had"], s["s_w_out"], None, rnd.gemm, torch.float16
        )
        return out, conv_state, ssm_state

    def _in_proj_halves(self, x_q, out_scale, rounding):
        """in_proj's output, sequence-last, as x and z (B, E, L), each contiguous: INT8 codes
        with ``out_scale``, float32 without (mode 3's dynamic conv input).

        For one sequence they are the two halves of one GEMM's (1, 2E, L) output. For more,
        those halves are strided (each sequence's rows 2E * L apart) and copying them cost more
        than the GEMM's epilogue (2.8B, batch 16 x 1024 tokens: ~0.35 ms per layer), so each
        half of the weight gets its own GEMM, written where the conv and scan read it."""
        e = self.cfg.d_inner
        s = self.scales()
        args = (s["s_in"], s["s_w_in"], out_scale, rounding, torch.float32)
        if x_q.shape[0] == 1:
            xz = self.backend.w8a8_linear(x_q, self.in_proj_weight, *args, layout="seq_last")
            return xz[:, :e], xz[:, e:]
        weight = self.in_proj_weight
        x_half = self.backend.w8a8_linear(x_q, weight[:e], *args, layout="seq_last")
        z_half = self.backend.w8a8_linear(x_q, weight[e:], *args, layout="seq_last")
        return x_half, z_half

    def _scan_implementation(self, impl: str, int8_inputs: bool) -> str:
        """What runs the scan, e.g. "ssm_int8: reference (PyTorch)" (recorded by stage probes)."""
        table = self.backend.implementations()
        if impl == "kernel_int8" and int8_inputs:
            return f"ssm_int8: {table['ssm_int8']}"
        if impl == "sim_kernel":
            return f"ssm_sim: {table['ssm_sim']}"
        return "ssm_reference: reference (PyTorch)"

    def _scan(self, u_in, dt_q, b_q, c_q, z_q, z_fp):
        """The selective scan in the implementation the datapath names.

        Returns (y float16 (B, L, E), the final state: INT8 snapshot (kernel) or float32 h).
        """
        s = self.scales()
        impl = self.datapath.ssm_impl
        int8_inputs = u_in.dtype == torch.int8 and z_q is not None
        self._probe("ssm_impl", self._scan_implementation(impl, int8_inputs))
        # The codes and scales as selective_scan_int8 takes them (u may be float32, z_q None).
        codes = (
            u_in, s["s_u"], dt_q, s["s_dt"], self.A_log, s["s_A"], b_q, s["s_xo"], c_q, s["s_xo"],
            self.D, s["s_D"], z_q, s["s_xz"], self.dt_bias, s["s_dtb"],
        )  # fmt: skip
        if impl == "kernel_int8" and int8_inputs:
            return self.backend.selective_scan_int8(
                *codes, s["s_h"], state_rounding=self.datapath.rounding.ssm_state
            )
        if impl == "sim_kernel" and z_q is not None and z_fp is None:
            # INT8 gate codes (u may be float32): the exact INT8 scan reads the codes and gives
            # the reference's bits (below) without its float32 copies of u, dt, B, C and z.
            return self.backend.selective_scan_int8_exact(*codes)
        # Reference semantics: dequantize every input in float32 (mode 3's gate z_fp is float32
        # already), then the sequential scan.
        u, delta_raw, A, B, C, D, z, delta_bias = ops.dequantize_scan_inputs(*codes)
        if z_fp is not None:
            z = z_fp
        args = (u, delta_raw, A, B, C, D, z, delta_bias)
        if impl == "sim_kernel":
            y, h_last = self.backend.selective_scan_sim(*args)
        else:
            y, h_last = ops.selective_scan(*args)
        return y.to(torch.float16), h_last


def quantize_per_sequence(x: torch.Tensor, scales: torch.Tensor, rounding: str) -> torch.Tensor:
    """Q8 of (B, E, L) float32 with one float32 scale per sequence (IEEE division, site rule)."""
    quotient = x / scales[:, None, None]
    return torch.clamp(ops.round_with(quotient, rounding), -128.0, 127.0).to(torch.int8)


def dynamic_scale_per_sequence(x: torch.Tensor, seq_lens: torch.Tensor | None) -> torch.Tensor:
    """max|x| / 127 over each sequence's real positions (B,) float32; 1.0 where the max is 0.

    Taken per sequence (not per batch) so a result never depends on what shares the batch, and
    only over the first ``seq_lens[b]`` positions so right padding does not change it.
    """
    # max |x| over the channels first (one pass over x, exact), then over the real positions.
    mag = torch.linalg.vector_norm(x, ord=float("inf"), dim=1)  # (B, L)
    if seq_lens is not None:
        positions = torch.arange(x.shape[-1], device=x.device)
        mag = torch.where(positions[None, :] < seq_lens[:, None].to(x.device), mag, 0.0)
    peak = mag.amax(dim=1).to(torch.float32)
    # A tensor divisor keeps the division IEEE on CUDA (a Python float becomes a reciprocal);
    # ops._f32 reuses one per device (creating it would synchronise with the GPU every call).
    scale = peak / ops._f32(127.0, peak.device)
    return torch.where(peak > 0, scale, torch.ones_like(scale))


class QRMSNorm(nn.Module):
    """Residual add + RMSNorm (weight folded into in_proj, so 1) -> INT8 with ``s_in``."""

    def __init__(self, d_model: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(d_model, dtype=torch.float32))

    def forward(self, hidden, residual, s_in: float, rounding: str, backend: Backend):
        return backend.rmsnorm(hidden, residual, self.weight, self.eps, s_in, rounding)


class QBlock(nn.Module):
    def __init__(self, cfg: QuantizedConfig) -> None:
        super().__init__()
        self.norm = QRMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.mixer = W8A8Mixer(cfg)

    def forward(self, hidden, residual, seq_lens=None):
        mixer = self.mixer
        x_q, residual = self.norm(
            hidden, residual, mixer.scales()["s_in"], mixer.datapath.rounding.norm, mixer.backend
        )
        mixer._probe("norm_out", x_q)
        return mixer(x_q, seq_lens), residual


class QuantizedBackbone(nn.Module):
    def __init__(self, cfg: QuantizedConfig) -> None:
        super().__init__()
        v, d = cfg.padded_vocab_size, cfg.d_model
        if cfg.embedding == "fp16":
            self.register_buffer("embedding_weight", torch.zeros(v, d, dtype=torch.float16))
        else:  # W8O16: int8 rows, one float16 scale per row
            self.register_buffer("embedding_weight", torch.zeros(v, d, dtype=torch.int8))
            self.register_buffer("embedding_scales", torch.ones(v, dtype=torch.float16))
        self.layers = nn.ModuleList(QBlock(cfg) for _ in range(cfg.n_layer))
        # Final norm weight (folded into lm_head by our pipeline, so 1); residual stream float32.
        self.register_buffer("norm_f_weight", torch.ones(d, dtype=torch.float32))
        self.embedding_kind = cfg.embedding

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids -> float32 (B, L, D) via float16 rows (dequantized in float32 for int8)."""
        rows = self.embedding_weight[input_ids]
        if self.embedding_kind == "int8":
            rows = (rows.float() * self.embedding_scales[input_ids].float()[..., None]).half()
        return rows.float()


@dataclass
class QuantizedOutput:
    logits: torch.Tensor


class QuantizedMambaLM(nn.Module):
    """Quamba1 W8A8 Mamba-1 LM: FP16 embedding and lm_head, INT8 blocks, FP32 residual stream."""

    def __init__(self, cfg: QuantizedConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = QuantizedBackbone(cfg)
        v, d = cfg.padded_vocab_size, cfg.d_model
        if cfg.lm_head == "fp16":
            self.register_buffer("lm_head_weight", torch.zeros(v, d, dtype=torch.float16))
        else:  # W8A8B16O16: INT8 final norm (s_lm_in), INT8 weight (s_w_lm), float16 logits
            self.register_buffer("lm_head_weight", torch.zeros(v, d, dtype=torch.int8))
            self.register_buffer("s_lm_in", _scale_buffer())
            self.register_buffer("s_w_lm", _scale_buffer())
        self.provenance: dict = {}

    @property
    def mixers(self) -> list[W8A8Mixer]:
        return [block.mixer for block in self.backbone.layers]

    @property
    def device(self) -> torch.device:
        return self.lm_head_weight.device

    def set_datapath(self, datapath: Datapath, backend: Backend | None = None) -> None:
        """Route every layer through ``datapath`` (validated once, up front)."""
        datapath.validate()
        for mixer in self.mixers:
            mixer.datapath = datapath
            if backend is not None:
                mixer.backend = backend

    @property
    def datapath(self) -> Datapath:
        return self.mixers[0].datapath

    @torch.no_grad()
    def forward(
        self, input_ids: torch.Tensor, seq_lens: torch.Tensor | None = None, last_only: bool = False
    ):
        """Token ids (B, L) -> ``.logits`` (B, L, padded vocab) float32 (B, 1, V) with
        ``last_only`` (the head on the last position only, as decoding needs)."""
        hidden = self.backbone.embed(input_ids)
        residual = None
        for block in self.backbone.layers:
            hidden, residual = block(hidden, residual, seq_lens)
        if last_only:
            hidden, residual = hidden[:, -1:], residual[:, -1:]
        logits = self._head(hidden.float() + residual)
        self.mixers[0].backend.check_deferred()
        return QuantizedOutput(logits=logits)

    def _lm_head_scales(self) -> tuple[float, float]:
        """(s_lm_in, s_w_lm) as checked Python floats, read once (no device sync per token)."""
        cached = getattr(self, "_head_scales", None)
        if cached is None:
            cached = float(self.s_lm_in), float(self.s_w_lm)
            for name, value in zip(("s_lm_in", "s_w_lm"), cached):
                if not (value > 0 and math.isfinite(value)):
                    raise ValueError(f"invalid lm_head scale {name}={value} (must be finite, > 0)")
            self._head_scales = cached
        return cached

    def _load_from_state_dict(self, *args, **kwargs):
        self._head_scales = None
        super()._load_from_state_dict(*args, **kwargs)

    def _head(self, residual: torch.Tensor) -> torch.Tensor:
        eps, weight = self.cfg.rms_norm_eps, self.backbone.norm_f_weight
        backend = self.mixers[0].backend
        rounding = self.datapath.rounding
        if self.cfg.lm_head == "int8":
            s_in, s_w = self._lm_head_scales()
            q, _ = backend.rmsnorm(residual, None, weight, eps, s_in, rounding.norm)
            return backend.w8a8_linear(
                q, self.lm_head_weight, s_in, s_w, None, rounding.gemm, torch.float16
            ).float()
        normed, _ = backend.rmsnorm(residual, None, weight, eps, None, rounding.norm)
        return backend.lm_head_fp16(normed, self.lm_head_weight)

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, last_only: bool = False):
        """Full forward that also returns the INT8 decode state of every layer (logits of the
        last position only with ``last_only``)."""
        for mixer in self.mixers:
            mixer.capture_state = True
        try:
            logits = self.forward(input_ids, last_only=last_only).logits
            state = [mixer.last_state for mixer in self.mixers]
        finally:
            for mixer in self.mixers:
                mixer.capture_state = False
                mixer.last_state = None
        return logits, state

    @torch.no_grad()
    def step(self, token_ids: torch.Tensor, state: list):
        """One token per sequence (B,) -> logits (B, V) and the new state (INT8 conv/SSM).

        With ``decode_kernel = "auto"`` (the default) and ``persistent_decode_supported``, the
        layers run as one persistent kernel (quamba_kernels.W8A8DecodeKernel: batch 1, Mode 0's
        datapath, compute capability 9.0+), otherwise as the per-op kernels; both give the same
        bits."""
        kernel = self._persistent_decode(token_ids, state)
        if kernel is not None:
            # The embedding rows are float16 values (see QuantizedBackbone.embed): exact in half.
            hidden, residual = kernel(self.backbone.embed(token_ids).half())
            logits = self._head(hidden.float() + residual)
            return logits, [tuple(layer) for layer in state]
        hidden = self.backbone.embed(token_ids)
        residual = None
        new_state = []
        for block, (conv_state, ssm_state) in zip(self.backbone.layers, state):
            mixer = block.mixer
            x_q, residual = block.norm(
                hidden, residual, mixer.scales()["s_in"], mixer.datapath.rounding.norm,
                mixer.backend,
            )  # fmt: skip
            hidden, conv_state, ssm_state = mixer.step(x_q, conv_state, ssm_state)
            new_state.append((conv_state, ssm_state))
        logits = self._head(hidden.float() + residual)
        self.mixers[0].backend.check_deferred()  # no-op (no host read) when nothing was flagged
        return logits, new_state

    #: How a CUDA decode step runs: "auto" (the default: the persistent decode kernel wherever
    #: ``persistent_decode_supported`` allows it, else the per-op kernels) or "per_op" (a kernel
    #: per op, ~7 per layer). Both give the same bits; the persistent kernel is faster (2.8B
    #: batch 1 on an H100: 1.45 against 1.87 ms per token; benchmarks/README.md, "Persistent
    #: decode kernel") and keeps one copy of x_proj's weight in its layout per model (~78 MB at
    #: 2.8B), built on the first persistent step.
    decode_kernel: str = "auto"
    #: Keyword arguments for quamba_kernels.W8A8DecodeKernel (``inflight``, ``timing``): assign a
    #: dict to set them for this model (the shared default is read-only).
    decode_kernel_options: Mapping = MappingProxyType({})

    def decode_implementation(self, batch: int = 1) -> str:
        """Which decode step ``step`` runs for this batch size: "persistent" or "per_op"."""
        if self.decode_kernel not in ("auto", "per_op"):
            raise ValueError(
                f'decode_kernel must be "auto" or "per_op", got {self.decode_kernel!r}'
            )
        if self.decode_kernel == "auto" and self.persistent_decode_supported(batch)[0]:
            return "persistent"
        return "per_op"

    def persistent_decode_supported(self, batch: int = 1) -> tuple[bool, str]:
        """(whether this model can decode ``batch`` sequences with the persistent kernel, why
        not); ``decode_kernel = "auto"`` then uses it."""
        if any(mixer.x_proj_weight.is_inference() for mixer in self.mixers):
            # The kernel keeps a copy of x_proj's weight and follows in-place writes to it by its
            # version counter, which inference tensors do not have.
            return False, (
                "x_proj's weight is an inference tensor (made under torch.inference_mode), whose "
                "in-place writes the persistent decode kernel's copy of it cannot follow; build or "
                "load the model outside inference_mode to use the kernel"
            )
        graphable, reason = self.graph_decoding_supported()
        if not graphable:
            return False, reason
        if batch != 1:
            return False, f"the persistent decode kernel takes batch 1, got {batch}"
        dp, cfg = self.datapath, self.cfg
        if any(mixer.datapath is not dp for mixer in self.mixers):
            return False, "the layers do not share one datapath"
        if dp.conv_input != "int8_static" or dp.gate != "int8" or not cfg.online_hadamard:
            return False, "the persistent decode kernel runs Mode 0's datapath (online Hadamard)"
        if cfg.d_conv != 4 or cfg.d_state != 16:
            return False, "the persistent decode kernel takes d_conv 4 and d_state 16"
        from quamba_kernels.decode import _shape_reason, decode_w8a8_supported
        from quamba_kernels.hadamard import hadamard_factors

        reason = _shape_reason(cfg.d_model, cfg.d_inner, cfg.dt_rank, cfg.d_state,
                               hadamard_factors(cfg.d_inner)[0])  # fmt: skip
        if reason:
            return False, f"the persistent decode kernel does not take these shapes: {reason}"
        return decode_w8a8_supported(self.device)

    def _persistent_decode(self, token_ids: torch.Tensor, state: list):
        """The persistent decode kernel for this state, or None where the per-op kernels run.
        Built once per state (kept on its first tensor, so a CUDA graph captured with it keeps
        its buffers alive) and rebuilt when the weights, scales, datapath or options change."""
        if token_ids.device.type != "cuda":
            return None
        if self.decode_implementation(token_ids.shape[0]) != "persistent":
            return None
        from quamba_kernels.decode import W8A8DecodeKernel

        mixers = self.mixers
        scales = [mixer.scales() for mixer in mixers]
        names = ("in_proj_weight", "conv_weight", "conv_bias", "x_proj_weight", "dt_proj_weight",
                 "A_log", "D", "dt_bias", "out_proj_weight")  # fmt: skip
        weights = [block.norm.weight for block in self.backbone.layers]
        weights += [getattr(mixer, name) for mixer in mixers for name in names]
        key = (
            [t.data_ptr() for layer in state for t in layer],
            [t.data_ptr() for t in weights],
            [mixer.x_proj_weight._version for mixer in mixers],  # the kernel copies x_proj's weight
        )
        holder = state[0][0]
        kernel = getattr(holder, "_quamba_decode_kernel", None)
        options = dict(self.decode_kernel_options)
        if kernel is not None:
            same = kernel.owner is self and kernel.key == key and kernel.datapath is self.datapath
            same = same and kernel.options == options
            if same and all(a is b for a, b in zip(kernel.scales, scales)):
                return kernel
        rnd = self.datapath.rounding
        roundings = {"norm": rnd.norm, "gemm": rnd.gemm, "conv": rnd.conv,
                     "ssm_state": rnd.ssm_state, "hadamard": rnd.hadamard}  # fmt: skip
        layers = []
        for block, s in zip(self.backbone.layers, scales):
            mixer = block.mixer
            layers.append({
                "norm_w": block.norm.weight, "w_in": mixer.in_proj_weight,
                "conv_w": mixer.conv_weight, "conv_b": mixer.conv_bias,
                "w_x": mixer.x_proj_weight, "w_dt": mixer.dt_proj_weight, "A_log": mixer.A_log,
                "D": mixer.D, "dt_bias": mixer.dt_bias, "w_out": mixer.out_proj_weight,
                "eps": block.norm.eps, "roundings": roundings, **s,
            })  # fmt: skip
        # One copy of x_proj's weight in the kernel's layout per model, shared by every decode
        # state's kernel; entries of weights the model no longer has are dropped.
        slab_cache = self.__dict__.setdefault("_decode_x_slabs", {})
        live = {id(mixer.x_proj_weight) for mixer in mixers}
        for stale in [k for k in slab_cache if k not in live]:
            del slab_cache[stale]
        kernel = W8A8DecodeKernel(layers, state, **options, x_slab_cache=slab_cache)
        kernel.owner, kernel.key, kernel.datapath, kernel.scales = self, key, self.datapath, scales
        kernel.options = options
        holder._quamba_decode_kernel = kernel
        return kernel

    def graph_decoding_supported(self) -> tuple[bool, str]:
        """(whether ``generate`` can capture the decode step in a CUDA graph, why not)."""
        backend = self.mixers[0].backend
        dp = self.datapath
        if self.device.type != "cuda":
            return False, f"the model is on {self.device}, CUDA graphs need a CUDA device"
        if backend.name != "kernel":
            return False, "the reference backend runs the decode step (kernels are not in use)"
        if dp.conv_output != "int8" or dp.ssm_input != "int8":
            return False, (
                "this mode's decode step converts between INT8 and FP32 with PyTorch reference "
                "ops (only modes with INT8 conv output and INT8 SSM input, e.g. 0, are captured)"
            )
        return True, ""

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        seed: int = 0,
        cuda_graph: bool | None = None,
    ) -> torch.Tensor:
        """Greedy (temperature 0) or sampled continuation; deterministic for a given seed.

        ``cuda_graph``: replay the decode step from a CUDA graph (same kernels, same bits, no
        per-kernel launch cost). None: whenever ``graph_decoding_supported()``; True: required
        (raises with the reason when it is not possible); False: never.
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        supported, reason = self.graph_decoding_supported()
        if cuda_graph and not supported:
            raise ValueError(f"cuda_graph=True but the decode step cannot be captured: {reason}")
        use_graph = supported if cuda_graph is None else bool(cuda_graph)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        logits, state = self.prefill(input_ids, last_only=True)
        next_logits = logits[:, -1, : self.cfg.vocab_size]
        tokens = [input_ids]
        graphed = None
        for _ in range(max_new_tokens):
            nxt = _pick(next_logits, temperature, top_k, generator)
            tokens.append(nxt[:, None])
            if use_graph:
                if graphed is None:
                    from quamba_layers.cuda_graph import GraphedStep

                    graphed = GraphedStep(self.step, nxt, state)
                step_logits = graphed(nxt)
            else:
                step_logits, state = self.step(nxt, state)
            next_logits = step_logits[:, : self.cfg.vocab_size]
        return torch.cat(tokens, dim=1)


def _pick(logits: torch.Tensor, temperature: float, top_k: int | None, generator) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1).cpu()
    return torch.multinomial(probs, 1, generator=generator)[:, 0].to(logits.device)

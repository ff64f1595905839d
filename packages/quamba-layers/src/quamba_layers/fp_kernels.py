"""The CUDA kernel path of the float Mamba model (`MambaLM.use_kernels`).

`MambaLM` runs its PyTorch reference ops (`quamba_layers.fp_ops`) unless `use_kernels` selects
the quamba-kernels float kernels. The choice is made once per model, recorded
(`MambaLM.implementations()`), and applied by attaching a `FloatKernelOps` to every `RMSNorm` and
`MambaMixer` (their `kernel_ops` attribute). The linear layers stay torch (cuBLAS); in prefill,
in_proj and dt_proj run as `weight @ x^T` so that cuBLAS writes the sequence-last layout the conv
and scan read, and x_proj reads the conv output through a transposed view (no transposing copies;
mamba_ssm computes them the same way). These are the same products as `F.linear`, but cuBLAS may
sum them in another order: not bit-identical to the reference path's GEMMs (GEMM rounding).

Kernel path, per stage, and how it follows the model's semantics:
- conv + SiLU (prefill): `quamba_kernels.causal_conv1d`. The kernel has no initial-state input, so
  a prefill that continues from a conv state runs over `cat(conv_state, x)` and drops the first
  K - 1 outputs (the same windows, the same float32 operations). Bit-identical to the reference.
- conv update (decode): `quamba_kernels.causal_conv1d_update` on a copy of the conv state (the
  kernel shifts its state in place; the model never modifies a given state). Bit-identical.
- selective scan (prefill) and state update (decode): `quamba_kernels.selective_scan` /
  `selective_state_update` with delta_bias + softplus, D, and the gate `silu(z)` fused in. The
  kernels round y to the model dtype once, after the gate; the reference gates in float32 and
  rounds in `project_out`: the same single rounding. The state update works on a copy of the
  state. Step: bit-identical. Scan: bit-identical with `exact_scan=True` (always for float32
  models: the float32 scan kernel has only the exact mode); the default fast mode for
  float16/bfloat16 (fused multiply-adds, hardware exp2) is within the kernel's documented bound
  `ulp(y) + 1e-5 * magnitude` of the float64 scan, i.e. about 2 ulps of the model dtype of the
  reference scan output.
- RMSNorm: `quamba_kernels.rmsnorm` without its residual (the model adds the residual itself).
  Not bit-identical: the kernel takes the mean of squares in float64 (rounded once) and
  `1 / sqrt` where the model uses a float32 `mean` and `rsqrt`: the output differs by at most a
  few float32 ulps before its rounding to the weight dtype, i.e. at most 1 ulp of a float16 /
  bfloat16 output.

End to end (measured by tests/test_fp_kernels.py on an H100, 2-layer random models, L <= 64):
float32 logits within 2.3e-7 (relative to max |logit|) of the reference path; float16/bfloat16
logits (fast scan) equal to the reference path's in 11 of 12 cases, 1.3e-4 in the other; the
error against a float64 model is never more than 2x the reference path's (the tested bound).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "FloatKernelOps",
    "KernelChoice",
    "implementations",
    "kernel_support",
    "use_kernels",
]

PREFERENCES = ("auto", "kernel", "reference")
REFERENCE = "reference (PyTorch)"
_KERNEL = "kernel (quamba_kernels.{})"
_MAX_STATE = 64  # quamba_kernels.scan.MAX_STATE
_MAX_NORM_DIM = 16384  # quamba_kernels.rmsnorm.MAX_DIM


def _kernel_module():
    """quamba_kernels, imported on first use (it is an optional dependency of quamba-layers)."""
    import quamba_kernels

    return quamba_kernels


@dataclass(frozen=True)
class KernelChoice:
    """What `MambaLM.use_kernels` decided: the request, the ops (None: reference), and why."""

    requested: str
    ops: FloatKernelOps | None
    reason: str


DEFAULT_CHOICE = KernelChoice("reference (default)", None, "use_kernels() was not called")


def kernel_support(config, device: torch.device | str) -> tuple[bool, str]:
    """(True, "") when the float kernels can run a model of `config` on `device`, else why not."""
    device = torch.device(device)
    if device.type != "cuda":
        return False, f"the model is on {device}; the kernels need a CUDA device"
    if not 2 <= config.d_conv <= 4:
        return False, f"d_conv = {config.d_conv} is not supported by the conv kernels (2..4)"
    if not 1 <= config.d_state <= _MAX_STATE:
        return False, f"d_state = {config.d_state} is larger than the scan kernels' {_MAX_STATE}"
    if config.d_model > _MAX_NORM_DIM:
        return False, f"d_model = {config.d_model} is larger than the RMSNorm kernel's limit"
    try:
        module = _kernel_module()
    except ImportError:
        return False, "quamba-kernels is not installed (pip install 'quamba-layers[kernels]')"
    return module.available()


def use_kernels(model, prefer: str = "auto", *, exact_scan: bool = False) -> KernelChoice:
    """Select the implementation of `model` (a MambaLM) and attach it to its norms and mixers.

    prefer: "auto" (kernels when the model is on CUDA and they can run, else the reference),
    "kernel" (RuntimeError with the reason when they cannot run), "reference" (the PyTorch ops).
    exact_scan: run the float16/bfloat16 scan in its exact mode (bit-identical to the reference)
    instead of the fast mode. Returns the recorded `KernelChoice` (also `model.kernel_choice`).
    """
    if prefer not in PREFERENCES:
        raise ValueError(f"prefer must be one of {PREFERENCES}, got {prefer!r}")
    if not isinstance(exact_scan, bool):
        raise TypeError(f"exact_scan must be a bool, got {exact_scan!r}")
    ops: FloatKernelOps | None = None
    reason = "requested"
    if prefer != "reference":
        usable, reason = kernel_support(model.config, model.device)
        if usable:
            ops = FloatKernelOps(exact_scan=exact_scan)
        elif prefer == "kernel":
            raise RuntimeError(f"the kernel path was requested but cannot run: {reason}")
    choice = KernelChoice(prefer, ops, reason)
    model.kernel_choice = choice
    for module in model.modules():
        if hasattr(module, "kernel_ops"):
            module.kernel_ops = ops
    return choice


def implementations(model) -> dict[str, str]:
    """What runs each op of `model` (a MambaLM), with the request and the reason of the choice."""
    choice: KernelChoice = model.kernel_choice
    linear = "torch (cuBLAS)" if model.device.type == "cuda" else f"torch ({model.device.type})"
    record = {
        "path": "kernel" if choice.ops is not None else "reference",
        "requested": choice.requested,
        "reason": choice.reason,
        "linear": linear,
    }
    if choice.ops is None:
        stages = ("rmsnorm", "conv1d", "conv1d_update", "selective_scan", "state_update", "gate")
        record.update(dict.fromkeys(stages, REFERENCE))
        record["decode"] = "eager"
    else:
        record.update(choice.ops.implementations(model.dtype))
        record["decode"] = "CUDA graph (generate default)"
    return record


def _seq_last_linear(x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    """`F.linear(x, weight, bias).transpose(1, 2)` for x (B, L, K), as a contiguous (B, N, L).

    Computed as weight @ x^T: cuBLAS reads x transposed and writes the sequence-last layout
    itself. Transposing F.linear's (B, L, N) output instead costs a strided copy per tensor (at
    Mamba-2.8B, batch 1, 1024 tokens: 8 of the 26 ms of a float16 prefill, measured)."""
    if x.shape[0] == 1:
        out = torch.mm(weight, x[0].t())[None]
    else:
        out = torch.bmm(weight.expand(x.shape[0], -1, -1), x.transpose(1, 2))
    return out if bias is None else out + bias[:, None]


def _seq_last_halves(x: torch.Tensor, weight: torch.Tensor, bias=None):
    """in_proj's output as x and z (B, N / 2, L), each contiguous: for one sequence the halves
    of one GEMM's output, for more one GEMM per half of the weight (the halves of a (B, N, L)
    output are strided, and the conv and scan would copy them)."""
    half = weight.shape[0] // 2
    if x.shape[0] == 1:
        return _seq_last_linear(x, weight, bias).chunk(2, dim=1)
    biases = (None, None) if bias is None else (bias[:half], bias[half:])
    return (
        _seq_last_linear(x, weight[:half], biases[0]),
        _seq_last_linear(x, weight[half:], biases[1]),
    )


def _token_major_linear(u: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`F.linear(u.transpose(1, 2), weight)` for u (B, K, L): (B, L, N) without copying u."""
    if u.shape[0] == 1:
        return torch.mm(u[0].t(), weight.t())[None]
    return torch.bmm(u.transpose(1, 2), weight.t().expand(u.shape[0], -1, -1))


class FloatKernelOps:
    """The kernel implementations of the RMSNorm and mixer stages (stateless; see module doc).

    The stage methods of the mixer (`project_in`, `project_x`, `project_dt`, `project_out`) are
    reused as they are, so the linears and the tensor layouts match the reference path exactly.
    """

    def __init__(self, exact_scan: bool = False) -> None:
        _kernel_module().require()  # KernelsUnavailable with the reason
        self.exact_scan = exact_scan

    def implementations(self, dtype: torch.dtype) -> dict[str, str]:
        exact = self.exact_scan or dtype == torch.float32
        scan = _KERNEL.format("selective_scan") + (", exact" if exact else ", fast")
        return {
            "rmsnorm": _KERNEL.format("rmsnorm") + ", float64 mean of squares",
            "conv1d": _KERNEL.format("causal_conv1d"),
            "conv1d_update": _KERNEL.format("causal_conv1d_update"),
            "selective_scan": scan,
            "state_update": _KERNEL.format("selective_state_update"),
            "gate": "fused into the scan kernels (float32, one rounding after it)",
        }

    def __repr__(self) -> str:
        return f"FloatKernelOps(exact_scan={self.exact_scan})"

    # --- RMSNorm ------------------------------------------------------------------------------

    def rmsnorm(self, norm, x: torch.Tensor) -> torch.Tensor:
        """`RMSNorm.forward` by the kernel: x (..., D) -> (..., D) in the weight dtype."""
        weight = norm.weight
        if weight.dtype not in (x.dtype, torch.float32):
            weight = weight.float()  # exact; the kernel takes x's dtype or float32
        out, _ = _kernel_module().rmsnorm(
            x.contiguous(), None, weight, norm.eps, out_dtype=norm.weight.dtype
        )
        return out

    # --- mixer --------------------------------------------------------------------------------

    @staticmethod
    def scan_params(mixer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A = -exp(A_log), D, dt_proj.bias) in float32, cached on the mixer and recomputed when
        a parameter is replaced or changed in place (torch's version counter): saves four small
        kernels per layer and decode step."""
        params = (mixer.A_log, mixer.D, mixer.dt_proj.bias)
        key = tuple((p.data_ptr(), p._version, p.device) for p in params)
        cached = mixer.__dict__.get("_kernel_scan_params")
        if cached is None or cached[0] != key:
            cached = (key, (mixer.A(), mixer.D.float(), mixer.dt_proj.bias.float()))
            mixer.__dict__["_kernel_scan_params"] = cached
        return cached[1]

    def mixer_forward(
        self,
        mixer,
        hidden: torch.Tensor,
        state: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """`MambaMixer.forward` by the kernels: hidden (B, L, D) -> (out, (conv, ssm state))."""
        conv_state, ssm_state = state if state is not None else (None, None)
        # in_proj and dt_proj write the sequence-last layout the conv and scan read (see
        # _seq_last_linear); x_proj reads u (B, E, L) through a transposed view.
        x, z = _seq_last_halves(hidden, mixer.in_proj.weight, mixer.in_proj.bias)
        u, conv_state = self.conv(mixer, x, conv_state)
        x_dbl = _token_major_linear(u, mixer.x_proj.weight)
        dt_low, B, C = torch.split(x_dbl, [mixer.dt_rank, mixer.d_state, mixer.d_state], dim=-1)
        delta_raw = _seq_last_linear(dt_low, mixer.dt_proj.weight)
        y, ssm_state = self.scan_gate(mixer, u, delta_raw, B.transpose(1, 2), C.transpose(1, 2), z,
                                      ssm_state)  # fmt: skip
        return mixer.project_out(y), (conv_state, ssm_state)

    def mixer_step(
        self, mixer, hidden: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """`MambaMixer.step` by the kernels: hidden (B, D) -> (out (B, D), new state)."""
        k = _kernel_module()
        conv_state, ssm_state = state
        x, z = mixer.project_in(hidden[:, None, :])
        x_t = x[..., 0].contiguous()
        # The kernels update their state in place: give them copies (the model's contract).
        conv_state = conv_state.to(x.dtype, memory_format=torch.contiguous_format, copy=True)
        u, conv_state = k.causal_conv1d_update(
            x_t, conv_state, mixer.conv1d.weight, mixer.conv1d.bias, activation="silu"
        )
        dt_low, B, C = mixer.project_x(u[..., None])
        delta_raw = mixer.project_dt(dt_low)
        ssm_state = ssm_state.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        A, D, dt_bias = self.scan_params(mixer)
        y, ssm_state = k.selective_state_update(
            ssm_state,
            u,
            delta_raw[..., 0].contiguous(),
            A,
            B[..., 0].contiguous(),
            C[..., 0].contiguous(),
            D=D,
            z=z[..., 0].contiguous(),
            dt_bias=dt_bias,
            dt_softplus=True,
        )
        return mixer.project_out(y[:, None, :])[:, 0], (conv_state, ssm_state)

    def conv(
        self, mixer, x: torch.Tensor, conv_state: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Causal conv + SiLU of x (B, E, L), continuing from conv_state (B, E, K - 1) or zeros."""
        keep = mixer.d_conv - 1
        conv = _kernel_module().causal_conv1d
        weight, bias = mixer.conv1d.weight, mixer.conv1d.bias
        if conv_state is None:
            u = conv(x.contiguous(), weight, bias, activation="silu")
            window = x if x.shape[-1] >= keep else F.pad(x, (keep - x.shape[-1], 0))
        else:
            window = torch.cat([conv_state.to(x.dtype), x], dim=-1)
            # The first K - 1 outputs belong to the previous chunk (and saw zero padding).
            u = conv(window, weight, bias, activation="silu")[..., keep:].contiguous()
        return u, window[..., window.shape[-1] - keep :].contiguous()

    def scan_gate(
        self,
        mixer,
        u: torch.Tensor,
        delta_raw: torch.Tensor,
        B: torch.Tensor,
        C: torch.Tensor,
        z: torch.Tensor,
        ssm_state: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scan + D skip + gate: -> y (B, L, E) in the model dtype, last state float32."""
        initial = None if ssm_state is None else ssm_state.float().contiguous()
        A, D, dt_bias = self.scan_params(mixer)
        return _kernel_module().selective_scan(
            u,
            delta_raw.contiguous(),
            A,
            B.contiguous(),
            C.contiguous(),
            D=D,
            z=z.contiguous(),
            delta_bias=dt_bias,
            delta_softplus=True,
            return_last_state=True,
            initial_state=initial,
            exact=self.exact_scan or u.dtype == torch.float32,
        )

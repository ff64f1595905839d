"""Resolve a mode for one run: overrides applied, validated, and what will actually run where.

`resolve_mode` is called once, before any forward pass. The result (`ResolvedMode`) is printed at
start (`describe()`) and serialized into every result file (`to_dict()`).

Design choice: the datapath says *what* each stage computes, the backend (quamba_layers.quant
`select_backend`) says *where*. A mode that declares the CUDA INT8 scan (`kernel_int8`) keeps that
semantics everywhere; on a device where the kernels cannot run (CPU, quamba-kernels not built) the
PyTorch reference of the same INT8 semantics (`reference_ops.selective_scan_int8`, INT8 state
snapshot included) is the implementation for that device, and a note records and prints it. An
explicit request for the kernel (`ssm_impl="kernel"`) that cannot be honoured raises `ModeError`
instead: there is never a silent fallback.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from quamba_layers.datapath import ROUNDING_RULES, Datapath, DatapathError
from quamba_modes.registry import Mode, ModeError, get_mode

SSM_IMPL_OVERRIDES = ("reference", "kernel")

KERNEL_TEXT = "kernel (quamba_kernels)"
REFERENCE_TEXT = "reference (PyTorch)"
# The ops of a backend's `implementations()` (quamba_layers.quant.backends) that resolve reads.
BACKEND_OPS = ("rmsnorm", "gemm", "conv1d", "ssm_int8", "ssm_sim", "hadamard")
# Which backend op runs the SSM for each ssm_impl (None: always the PyTorch reference scan).
_SSM_BACKEND_OP = {"kernel_int8": "ssm_int8", "sim_kernel": "ssm_sim", "reference": None}
_SSM_WHAT = {
    "kernel_int8": "INT8 selective scan",
    "sim_kernel": "scan bit-identical to the sequential reference",
    "reference": "sequential float32 scan",
}


# (label, Datapath attribute) of every stage, in datapath order; rounding is shown apart.
STAGES = (
    ("conv input", "conv_input"),
    ("conv output", "conv_output"),
    ("x_proj input", "x_proj_input"),
    ("SSM input u", "ssm_input"),
    ("SSM implementation", "ssm_impl"),
    ("gate z", "gate"),
    ("linears", "linears"),
)


def datapath_stages(datapath: Datapath) -> list[tuple[str, str]]:
    """(stage label, value) for every stage of `datapath`, in the order of STAGES."""
    return [(label, getattr(datapath, attribute)) for label, attribute in STAGES]


@dataclass(frozen=True)
class ResolvedMode:
    """A mode as it will run: final datapath (overrides applied), implementations, notes."""

    mode: Mode
    datapath: Datapath | None  # final; None for the float modes
    rounding_override: str | None
    ssm_impl_override: str | None
    device: str
    kernels_available: bool
    implementations: MappingProxyType  # stage -> what runs there
    notes: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.mode.name

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe provenance record of this run's mode."""
        mode = self.mode
        return {
            "name": mode.name,
            "title": mode.title,
            "description": mode.description,
            "kind": mode.kind,
            "float_dtype": mode.float_dtype,
            "datapath": None if self.datapath is None else self.datapath.to_dict(),
            "x_proj_input": None if self.datapath is None else self.datapath.x_proj_input,
            "declared_datapath": None if mode.datapath is None else mode.datapath.to_dict(),
            "overrides": {"rounding": self.rounding_override, "ssm_impl": self.ssm_impl_override},
            "device": self.device,
            "kernels_available": self.kernels_available,
            "implementations": dict(self.implementations),
            "notes": list(self.notes),
            "intent": [relation.to_dict() for relation in mode.intent],
        }

    def describe(self) -> str:
        """Multi-line text printed at the start of a run."""
        mode = self.mode
        lines = [f"mode {mode.name}: {mode.title}", f"  {mode.description}"]
        if self.datapath is None:
            lines.append(f"  model: unquantized {mode.float_dtype}")
        else:
            for label, value in datapath_stages(self.datapath):
                lines.append(f"  {label:<19} {value}")
            rounding = " ".join(f"{k}={v}" for k, v in self.datapath.rounding.to_dict().items())
            lines.append(f"  {'rounding':<19} {rounding}")
        overrides = [
            f"{key}={value}"
            for key, value in (
                ("rounding", self.rounding_override),
                ("ssm_impl", self.ssm_impl_override),
            )
            if value is not None
        ]
        lines.append(f"  {'overrides':<19} {', '.join(overrides) or 'none'}")
        lines.append(
            f"  {'device':<19} {self.device} (kernels available: {self.kernels_available})"
        )
        for stage, text in self.implementations.items():
            lines.append(f"  runs: {stage:<13} {text}")
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


def _backend_texts(given: Mapping[str, str] | None, kernels_usable: bool) -> dict[str, str]:
    if given is None:
        text = KERNEL_TEXT if kernels_usable else REFERENCE_TEXT
        return dict.fromkeys(BACKEND_OPS, text)
    if not isinstance(given, Mapping):
        raise TypeError(f"backend_implementations must be a mapping, got {type(given).__name__}")
    missing = [op for op in BACKEND_OPS if not isinstance(given.get(op), str)]
    if missing:
        raise ModeError(
            f"backend_implementations lacks a text for {missing}; expected a str for each of "
            f"{list(BACKEND_OPS)} (a backend's implementations())"
        )
    return {op: given[op] for op in BACKEND_OPS}


def _device_text(device: Any) -> str:
    # Accepts "cpu", "cuda", "cuda:1" or a torch.device (anything whose str() is such a name).
    text = str(device).strip() if device is not None else ""
    kind = text.split(":", 1)[0]
    if not kind or not kind.isalnum():
        raise ModeError(f"device {device!r} is not accepted; expected e.g. 'cpu', 'cuda', 'cuda:0'")
    return text


def resolve_mode(
    name: str | Mode,
    *,
    rounding: str | None = None,
    ssm_impl: str | None = None,
    device: Any = "cpu",
    kernels_available: bool = False,
    kernels_reason: str = "",
    backend_implementations: Mapping[str, str] | None = None,
) -> ResolvedMode:
    """Resolve mode `name` for a run on `device`, with optional per-run overrides.

    rounding: "half_even" | "half_away" | None: one rule for every rounding site.
    ssm_impl: "reference" (the PyTorch scan, any mode) | "kernel" (the CUDA INT8 scan for modes
        that declare it, else the GPU simulation scan `sim_kernel`; needs a CUDA device and usable
        kernels) | None (as the mode declares).
    kernels_available / kernels_reason: whether quamba_kernels can run here and, if not, why
        (as returned by `quamba_kernels.available()`).
    backend_implementations: `implementations()` of the backend the model will run on (keys
        rmsnorm, gemm, conv1d, ssm_int8, ssm_sim, hadamard). When None it is derived: every op on
        the kernels where they are usable, else on the PyTorch reference. Pass the real backend's
        when it is known: it is what gets recorded.
    Raises ModeError for removed/unknown modes, invalid overrides, overrides on the float modes,
    and an explicit kernel request that cannot be honoured.
    """
    mode = get_mode(name)
    device_text = _device_text(device)
    if not isinstance(kernels_available, bool):
        raise TypeError(f"kernels_available must be a bool, got {type(kernels_available).__name__}")
    if rounding is not None and rounding not in ROUNDING_RULES:
        raise ModeError(
            f"rounding override {rounding!r} is not accepted; expected one of "
            f"{', '.join(ROUNDING_RULES)}"
        )
    if ssm_impl is not None and ssm_impl not in SSM_IMPL_OVERRIDES:
        raise ModeError(
            f"ssm_impl override {ssm_impl!r} is not accepted; expected one of "
            f"{', '.join(SSM_IMPL_OVERRIDES)}"
        )

    on_cuda = device_text.split(":", 1)[0] == "cuda"
    kernels_usable = on_cuda and kernels_available
    if not on_cuda:
        why_not = f"the device is {device_text!r} and the kernels run on CUDA devices only"
    else:
        why_not = (
            f"quamba_kernels cannot run on {device_text!r} ({kernels_reason or 'not available'})"
        )

    if not mode.is_quantized:
        if rounding is not None or ssm_impl is not None:
            raise ModeError(
                f"mode {mode.name} is the unquantized {mode.float_dtype} model: it has no rounding "
                "sites and no INT8 SSM, so rounding / ssm_impl overrides apply to quantized modes "
                "only"
            )
        implementations = {
            "model": f"PyTorch {mode.float_dtype} (unquantized, quamba_layers.model)"
        }
        return ResolvedMode(
            mode=mode,
            datapath=None,
            rounding_override=None,
            ssm_impl_override=None,
            device=device_text,
            kernels_available=kernels_available,
            implementations=MappingProxyType(implementations),
            notes=(),
        )

    backend = _backend_texts(backend_implementations, kernels_usable)
    datapath = mode.datapath
    try:
        if rounding is not None:
            datapath = datapath.with_rounding(rounding)
        if ssm_impl == "reference":
            datapath = datapath.with_ssm_impl("reference")
        elif ssm_impl == "kernel":
            kernel = "kernel_int8" if datapath.ssm_impl == "kernel_int8" else "sim_kernel"
            if not kernels_usable:
                raise ModeError(
                    f"kernel implementation requested but {why_not}; use ssm_impl 'reference' "
                    "(--ssm-impl reference) or run on a CUDA device with quamba-kernels built"
                )
            if not backend[_SSM_BACKEND_OP[kernel]].startswith("kernel"):
                raise ModeError(
                    f"kernel implementation requested but the selected backend runs "
                    f"{_SSM_BACKEND_OP[kernel]} as {backend[_SSM_BACKEND_OP[kernel]]!r}; select "
                    "the kernel backend or use ssm_impl 'reference' (--ssm-impl reference)"
                )
            datapath = datapath.with_ssm_impl(kernel)
        elif (
            ssm_impl is None
            and datapath.ssm_impl == "reference"
            and kernels_usable
            and backend["ssm_sim"].startswith("kernel")
        ):
            # The GPU simulation scan is bit-identical to the sequential reference, so it is the
            # same semantics at kernel speed; --ssm-impl reference forces the PyTorch loop.
            datapath = datapath.with_ssm_impl("sim_kernel")
    except DatapathError as exc:
        raise ModeError(f"mode {mode.name}: {exc}") from None

    op = _SSM_BACKEND_OP[datapath.ssm_impl]
    ssm_runner = REFERENCE_TEXT if op is None else backend[op]
    notes: list[str] = []
    if op is not None and not ssm_runner.startswith("kernel"):
        # Declared by the mode (an explicit request was checked above): the reference of the same
        # semantics is this device's implementation. Said, not silent.
        reason = why_not if not kernels_usable else "the selected backend runs the reference"
        notes.append(
            f"mode {mode.name} declares ssm_impl '{datapath.ssm_impl}', but {reason}: the SSM runs "
            "the PyTorch reference of the same semantics (results may differ from the kernel in "
            "the last bits, through the floating-point evaluation order)"
        )
    implementations = {
        "rmsnorm": backend["rmsnorm"],
        "gemm": backend["gemm"],
        "conv1d": backend["conv1d"],
        "ssm": f"{ssm_runner}: {datapath.ssm_impl}, {_SSM_WHAT[datapath.ssm_impl]}",
        "hadamard": backend["hadamard"],
    }
    return ResolvedMode(
        mode=mode,
        datapath=datapath,
        rounding_override=rounding,
        ssm_impl_override=ssm_impl,
        device=device_text,
        kernels_available=kernels_available,
        implementations=MappingProxyType(implementations),
        notes=tuple(notes),
    )

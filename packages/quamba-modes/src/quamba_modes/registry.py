"""The mode registry: every precision mode is one `Mode` entry (data, not a code path).

Built-in modes follow the intended semantics of the spec (docs: spec/modes.md):
`0`, `2-0`, `2-1`, `2-2`, `2-3`, `2-4`, `3` (quantized) and `fp16`, `fp32` (the unquantized model,
the reference for comparisons). `1` was removed by the seed system as redundant with `3`; asking for
it fails with a message naming `3` and `fp32`.

The registry is open: `register_mode(Mode(...))` adds a mode; the layers only read its `Datapath`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from quamba_layers.datapath import Datapath, DatapathError


class ModeError(ValueError):
    """A mode name, override or selection cannot be honoured; the message says what is accepted."""


MODE_KINDS = ("quantized", "float")
FLOAT_DTYPES = ("float16", "float32")

# How two modes are expected to compare on the same checkpoint and inputs (spec/modes.md).
RELATION_KINDS = (
    "bit_identical",  # every output bit equal
    "within_tolerance",  # same inputs and algebra, different evaluation order
    "differs_at_ties",  # codes differ only where a value lies exactly on a rounding tie
    "differs_only_in",  # differs only through the stage named in the note
)

# Names that must never resolve to a mode, with the reason given to the user.
REMOVED_MODES = {
    "1": (
        "mode '1' was removed by the seed system as redundant with mode '3'; use --mode 3 "
        "(INT8 linears, dynamic-scale conv input, FP32 conv and SSM) or --mode fp32 "
        "(the unquantized model, the reference for comparisons)"
    ),
}
# Words with a meaning in mode lists, so never mode names.
RESERVED_NAMES = ("all",)

_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


@dataclass(frozen=True)
class Relation:
    """An expected relation of a mode to another mode, checked by tests and comparisons."""

    kind: str
    other: str
    note: str = ""

    def __post_init__(self) -> None:
        if self.kind not in RELATION_KINDS:
            raise ModeError(
                f"relation kind {self.kind!r} is not accepted; expected one of "
                f"{', '.join(RELATION_KINDS)}"
            )
        if not isinstance(self.other, str) or not self.other:
            raise ModeError(f"relation.other must be a mode name, got {self.other!r}")

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "other": self.other, "note": self.note}


@dataclass(frozen=True)
class Mode:
    """A named precision mode: a `Datapath` (quantized) or a float dtype (the unquantized model)."""

    name: str
    title: str
    description: str
    kind: str
    datapath: Datapath | None = None
    float_dtype: str | None = None
    intent: tuple[Relation, ...] = field(default=())

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_PATTERN.match(self.name):
            raise ModeError(
                f"mode name {self.name!r} is not accepted: use lower-case letters, digits, "
                "'.', '_' and '-', starting with a letter or digit (e.g. '5-1')"
            )
        if self.kind not in MODE_KINDS:
            raise ModeError(
                f"mode {self.name}: kind {self.kind!r} is not accepted; expected one of "
                f"{', '.join(MODE_KINDS)}"
            )
        if self.kind == "quantized":
            if not isinstance(self.datapath, Datapath):
                raise ModeError(f"mode {self.name}: a quantized mode needs a Datapath")
            if self.float_dtype is not None:
                raise ModeError(f"mode {self.name}: float_dtype is only for float modes")
        else:
            if self.datapath is not None:
                raise ModeError(f"mode {self.name}: a float mode has no quantized datapath")
            if self.float_dtype not in FLOAT_DTYPES:
                raise ModeError(
                    f"mode {self.name}: float_dtype {self.float_dtype!r} is not accepted; "
                    f"expected one of {', '.join(FLOAT_DTYPES)}"
                )
        if not isinstance(self.intent, tuple) or not all(
            isinstance(relation, Relation) for relation in self.intent
        ):
            raise ModeError(f"mode {self.name}: intent must be a tuple of Relation")

    @property
    def is_quantized(self) -> bool:
        return self.kind == "quantized"

    @property
    def expected_equal_to(self) -> str | None:
        """The mode this one must equal bit for bit, if any."""
        for relation in self.intent:
            if relation.kind == "bit_identical":
                return relation.other
        return None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe description; `Mode.from_dict(m.to_dict()) == m`."""
        return {
            "name": self.name,
            "title": self.title,
            "description": self.description,
            "kind": self.kind,
            "float_dtype": self.float_dtype,
            "datapath": None if self.datapath is None else self.datapath.to_dict(),
            "x_proj_input": None if self.datapath is None else self.datapath.x_proj_input,
            "intent": [relation.to_dict() for relation in self.intent],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Mode:
        """Inverse of `to_dict` (the derived `x_proj_input` is recomputed, not read)."""
        try:
            datapath = data["datapath"]
            return cls(
                name=data["name"],
                title=data["title"],
                description=data["description"],
                kind=data["kind"],
                datapath=None if datapath is None else Datapath.from_dict(datapath),
                float_dtype=data["float_dtype"],
                intent=tuple(Relation(**relation) for relation in data["intent"]),
            )
        except (KeyError, TypeError) as exc:
            raise ModeError(f"Mode.from_dict: malformed description ({exc})") from None
        except DatapathError as exc:
            raise ModeError(f"Mode.from_dict: {exc}") from None


def _quantized(
    name: str,
    title: str,
    description: str,
    *,
    conv_output: str,
    ssm_input: str,
    ssm_impl: str,
    conv_input: str = "int8_static",
    gate: str = "int8",
    intent: tuple[Relation, ...] = (),
) -> Mode:
    datapath = Datapath(
        conv_input=conv_input,
        conv_output=conv_output,
        ssm_input=ssm_input,
        ssm_impl=ssm_impl,
        gate=gate,
        linears="int8",
    )
    return Mode(name, title, description, "quantized", datapath=datapath, intent=intent)


_BUILTIN_MODES = (
    _quantized(
        "0",
        "Baseline INT8 (upstream Quamba1)",
        "The upstream Quamba1 W8A8 datapath: INT8 conv output feeds x_proj and the CUDA INT8 "
        "selective-scan kernel.",
        conv_output="int8",
        ssm_input="int8",
        ssm_impl="kernel_int8",
    ),
    _quantized(
        "2-0",
        "INT8 kernel after re-quantisation",
        "Conv output as FP32 on the INT8 grid, re-quantised with s_u for the CUDA INT8 scan: "
        "checks the dequantise/re-quantise plumbing against mode 0.",
        conv_output="fp32_grid",
        ssm_input="requant_int8",
        ssm_impl="kernel_int8",
        intent=(Relation("bit_identical", "0", "re-quantising grid values returns the codes"),),
    ),
    _quantized(
        "2-1",
        "Reference INT8 scan",
        "INT8 conv codes passed directly to the PyTorch reference of the INT8 scan: verifies "
        "the kernel against its reference.",
        conv_output="int8",
        ssm_input="int8",
        ssm_impl="reference",
        intent=(
            Relation(
                "within_tolerance",
                "0",
                "same INT8 inputs and algebra, different floating-point evaluation order",
            ),
        ),
    ),
    _quantized(
        "2-2",
        "FP32 grid, reference scan",
        "Conv output as FP32 on the INT8 grid into the reference FP32 scan, which computes "
        "the same products as mode 2-1.",
        conv_output="fp32_grid",
        ssm_input="fp32_grid",
        ssm_impl="reference",
        intent=(Relation("bit_identical", "2-1", "the FP32 scan on grid values"),),
    ),
    _quantized(
        "2-3",
        "True FP32 conv + INT8 scan",
        "True FP32 conv output (no output quantisation), re-quantised with s_u for x_proj and "
        "for the reference INT8 scan.",
        conv_output="fp32",
        ssm_input="requant_int8",
        ssm_impl="reference",
        intent=(
            Relation(
                "differs_at_ties",
                "2-1",
                "conv codes vs Q8(true FP32, s_u) differ only at rounding ties",
            ),
        ),
    ),
    _quantized(
        "2-4",
        "True FP32 conv + FP32 scan",
        "True FP32 conv output, unclipped and unrounded, into the reference FP32 scan; x_proj "
        "gets Q8(v, s_u).",
        conv_output="fp32",
        ssm_input="fp32",
        ssm_impl="reference",
        intent=(Relation("differs_only_in", "2-2", "u: unclipped, unrounded"),),
    ),
    _quantized(
        "3",
        "Hybrid precision (dynamic conv input)",
        "The float in_proj output quantised per sequence with max|x|/127 for the conv, true FP32 "
        "conv output and FP32 scan, float gate z, INT8 linears.",
        conv_input="int8_dynamic",
        conv_output="fp32",
        ssm_input="fp32",
        ssm_impl="reference",
        gate="fp32",
        intent=(Relation("differs_only_in", "2-4", "the conv input (and the float gate z)"),),
    ),
    Mode(
        "fp16",
        "FP16 model",
        "The unquantized model in float16: a reference for every comparison.",
        "float",
        float_dtype="float16",
    ),
    Mode(
        "fp32",
        "FP32 model",
        "The unquantized model in float32: the reference for every comparison.",
        "float",
        float_dtype="float32",
    ),
)
BUILTIN_MODE_NAMES = tuple(mode.name for mode in _BUILTIN_MODES)

_REGISTRY: dict[str, Mode] = {mode.name: mode for mode in _BUILTIN_MODES}
# Read-only, ordered view of the registry (registration order); it follows `register_mode`.
REGISTRY = MappingProxyType(_REGISTRY)


def mode_names() -> tuple[str, ...]:
    """Registered mode names, in registration order."""
    return tuple(_REGISTRY)


def get_mode(name: str | Mode) -> Mode:
    """The registered mode called `name`; `ModeError` for removed or unknown names."""
    if isinstance(name, Mode):
        return name
    if not isinstance(name, str):
        raise TypeError(f"a mode name must be a str, got {type(name).__name__}")
    key = name.strip().lower()
    if key in REMOVED_MODES:
        raise ModeError(REMOVED_MODES[key])
    if key not in _REGISTRY:
        raise ModeError(f"unknown mode {name!r}; valid modes: {', '.join(_REGISTRY)}")
    return _REGISTRY[key]


def parse_modes(spec: str | Iterable[str]) -> tuple[Mode, ...]:
    """Modes named by a comma-separated list (or an iterable of names), in the order given.

    `all` stands for every registered quantized mode (the float references fp16/fp32 are left
    out; name them explicitly, e.g. "all,fp32"). A mode named twice is kept once.
    """
    if isinstance(spec, str):
        tokens = spec.split(",")
    else:
        tokens = list(spec)
        if not all(isinstance(token, str) for token in tokens):
            raise TypeError("parse_modes needs a str or an iterable of str")
    tokens = [token.strip() for token in tokens]
    if not any(tokens) or not all(tokens):
        raise ModeError(
            f"empty mode in list {spec!r}; give comma-separated names from: "
            f"{', '.join(_REGISTRY)} (or 'all')"
        )
    selected: dict[str, Mode] = {}
    for token in tokens:
        if token.lower() == "all":
            for mode in _REGISTRY.values():
                if mode.is_quantized:
                    selected.setdefault(mode.name, mode)
        else:
            mode = get_mode(token)
            selected.setdefault(mode.name, mode)
    return tuple(selected.values())


def register_mode(mode: Mode) -> Mode:
    """Add a new mode to the registry (validated); refuses duplicates and reserved names."""
    if not isinstance(mode, Mode):
        raise TypeError(f"register_mode needs a Mode, got {type(mode).__name__}")
    if mode.name in REMOVED_MODES:
        raise ModeError(f"cannot register mode {mode.name!r}: {REMOVED_MODES[mode.name]}")
    if mode.name in RESERVED_NAMES:
        raise ModeError(f"cannot register mode {mode.name!r}: the name is reserved")
    if mode.name in _REGISTRY:
        raise ModeError(f"mode {mode.name!r} is already registered")
    for relation in mode.intent:
        if relation.other not in _REGISTRY:
            raise ModeError(
                f"mode {mode.name}: relation to unknown mode {relation.other!r}; "
                f"registered: {', '.join(_REGISTRY)}"
            )
    _REGISTRY[mode.name] = mode
    return mode


def unregister_mode(name: str) -> None:
    """Remove a mode added with `register_mode` (the built-in modes cannot be removed)."""
    if name in BUILTIN_MODE_NAMES:
        raise ModeError(f"mode {name!r} is built in and cannot be removed")
    if name not in _REGISTRY:
        raise ModeError(f"mode {name!r} is not registered")
    del _REGISTRY[name]

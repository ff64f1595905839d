"""What a precision mode sets, stage by stage: the `Datapath` read by the quantized mixer.

A `Datapath` is frozen data, validated when it is built. Layers read its fields and never look at
mode names or environment variables (the names live in `quamba_modes`). Pure Python: no torch here.

Stages (docs/design.md, "Datapath"):
- `conv_input`: `int8_static` (in_proj INT8 codes, scale s_xz) | `int8_dynamic` (the float in_proj
  output, quantized per sequence with max|x|/127; the gate z is that float output too)
- `conv_output`: `int8` (codes, s_u) | `fp32_grid` (codes * s_u in float32) | `fp32` (true float32:
  no division by s_u, no rounding, no clamp)
- `ssm_input` (u): `int8` (codes) | `fp32_grid` | `requant_int8` (Q8(v, s_u) with the `requant`
  rule) | `fp32` (true float32, unclipped)
- `ssm_impl`: `kernel_int8` (CUDA INT8 scan) | `reference` (sequential float32 PyTorch scan) |
  `sim_kernel` (GPU scan bit-identical to the reference)
- `gate` (z): `int8` (in_proj codes, s_xz) | `fp32` (the float in_proj output)
- `linears`: `int8`
- `rounding`: the rule of every rounding site (`Rounding`)
x_proj always receives INT8 codes: the conv codes, or Q8(v, s_u) of a true float32 conv output.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

ROUNDING_RULES = ("half_away", "half_even")
ROUNDING_SITES = ("norm", "gemm", "conv", "ssm_state", "hadamard", "requant")

CONV_INPUTS = ("int8_static", "int8_dynamic")
CONV_OUTPUTS = ("int8", "fp32_grid", "fp32")
SSM_INPUTS = ("int8", "fp32_grid", "requant_int8", "fp32")
SSM_IMPLS = ("kernel_int8", "reference", "sim_kernel")
GATES = ("int8", "fp32")
LINEARS = ("int8",)

# Values of `Datapath.x_proj_input`.
XPROJ_CONV_CODES = "int8 codes"
XPROJ_REQUANT = "Q8(v, s_u)"

# The SSM inputs that arrive as INT8 codes (what the INT8 kernel accepts).
_INT8_SSM_INPUTS = ("int8", "requant_int8")


class DatapathError(ValueError):
    """A datapath description is malformed or inconsistent; the message says what and why."""


def _check_choice(owner: str, name: str, value: Any, accepted: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in accepted:
        raise DatapathError(
            f"{owner}.{name} = {value!r} is not accepted; expected one of {', '.join(accepted)}"
        )


@dataclass(frozen=True, kw_only=True)
class Rounding:
    """Rounding rule of each site; defaults are upstream Quamba's (docs/design.md, "Rounding")."""

    norm: str = "half_even"  # RMSNorm INT8 output
    gemm: str = "half_even"  # INT8 GEMM epilogues (in_proj, x_proj, dt_proj)
    conv: str = "half_away"  # conv1d INT8 output
    ssm_state: str = "half_away"  # INT8 SSM state snapshot
    hadamard: str = "half_away"  # Hadamard INT8 output
    requant: str = "half_even"  # re-quantisation of float32 values (Q8(v, s_u) for x_proj / SSM)

    def __post_init__(self) -> None:
        for site in ROUNDING_SITES:
            _check_choice("Rounding", site, getattr(self, site), ROUNDING_RULES)

    @classmethod
    def uniform(cls, rule: str) -> Rounding:
        """Every site rounds with `rule` ("half_away" or "half_even")."""
        _check_choice("Rounding", "<all sites>", rule, ROUNDING_RULES)
        return cls(**{site: rule for site in ROUNDING_SITES})

    def to_dict(self) -> dict[str, str]:
        """Site -> rule, in the order of ROUNDING_SITES."""
        return {site: getattr(self, site) for site in ROUNDING_SITES}

    @classmethod
    def from_dict(cls, data: Any) -> Rounding:
        """Inverse of `to_dict`; every site must be present, nothing else."""
        _check_keys("Rounding", data, ROUNDING_SITES)
        return cls(**{site: data[site] for site in ROUNDING_SITES})


_DATAPATH_FIELDS = ("conv_input", "conv_output", "ssm_input", "ssm_impl", "gate", "linears")
_CHOICES = {
    "conv_input": CONV_INPUTS,
    "conv_output": CONV_OUTPUTS,
    "ssm_input": SSM_INPUTS,
    "ssm_impl": SSM_IMPLS,
    "gate": GATES,
    "linears": LINEARS,
}


@dataclass(frozen=True, kw_only=True)
class Datapath:
    """Numeric format and implementation of every stage of the quantized Mamba block.

    Built validated: an inconsistent combination raises `DatapathError` at construction.
    """

    conv_input: str = "int8_static"
    conv_output: str
    ssm_input: str
    ssm_impl: str
    gate: str = "int8"
    linears: str = "int8"
    rounding: Rounding = field(default_factory=Rounding)

    def __post_init__(self) -> None:
        for name in _DATAPATH_FIELDS:
            _check_choice("Datapath", name, getattr(self, name), _CHOICES[name])
        if not isinstance(self.rounding, Rounding):
            raise DatapathError(
                f"Datapath.rounding must be a Rounding, got {type(self.rounding).__name__}"
            )
        self.validate()

    def problems(self) -> list[str]:
        """Every inconsistency of this combination of stages (empty when it is valid)."""
        found = []
        if self.ssm_input == "int8" and self.conv_output != "int8":
            found.append(
                f"ssm_input 'int8' passes the conv's INT8 codes, so it needs conv_output 'int8' "
                f"(got {self.conv_output!r}; use 'requant_int8' to re-quantise a float output)"
            )
        if self.ssm_input == "fp32" and self.conv_output != "fp32":
            found.append(
                f"ssm_input 'fp32' (true float32) needs conv_output 'fp32' (got "
                f"{self.conv_output!r}; use 'fp32_grid' for float values on the INT8 grid)"
            )
        if self.ssm_input == "fp32_grid" and self.conv_output not in ("fp32_grid", "int8"):
            found.append(
                f"ssm_input 'fp32_grid' needs conv codes on the s_u grid: conv_output 'fp32_grid' "
                f"or 'int8' (got {self.conv_output!r})"
            )
        if self.ssm_input == "requant_int8" and self.conv_output == "int8":
            found.append(
                "ssm_input 'requant_int8' re-quantises a float conv output; with conv_output "
                "'int8' the codes are already INT8: use ssm_input 'int8'"
            )
        if self.ssm_impl == "kernel_int8" and self.ssm_input not in _INT8_SSM_INPUTS:
            found.append(
                f"ssm_impl 'kernel_int8' takes INT8 u, so ssm_input must be 'int8' or "
                f"'requant_int8' (got {self.ssm_input!r}; use ssm_impl 'reference' or 'sim_kernel')"
            )
        if self.conv_input == "int8_dynamic" and self.conv_output != "fp32":
            found.append(
                f"conv_input 'int8_dynamic' needs conv_output 'fp32' (got {self.conv_output!r})"
            )
        if self.conv_input == "int8_dynamic" and self.gate != "fp32":
            found.append(
                "conv_input 'int8_dynamic' uses the float in_proj output, so the gate must be "
                f"'fp32' too (got {self.gate!r})"
            )
        if self.gate == "fp32" and self.conv_input != "int8_dynamic":
            found.append(
                "gate 'fp32' is the float in_proj output, which exists only with conv_input "
                f"'int8_dynamic' (got {self.conv_input!r})"
            )
        return found

    def validate(self) -> None:
        """Raise `DatapathError` listing every inconsistency; return None when valid."""
        found = self.problems()
        if found:
            raise DatapathError("inconsistent datapath: " + "; ".join(found))

    @property
    def x_proj_input(self) -> str:
        """What x_proj receives: the conv's INT8 codes, or Q8(v, s_u) of a true float32 output."""
        return XPROJ_REQUANT if self.conv_output == "fp32" else XPROJ_CONV_CODES

    def with_rounding(self, rule: str) -> Datapath:
        """A copy in which every rounding site uses `rule` ("half_away" or "half_even")."""
        return dataclasses.replace(self, rounding=Rounding.uniform(rule))

    def with_ssm_impl(self, ssm_impl: str) -> Datapath:
        """A copy with another SSM implementation (validated: kernel_int8 needs INT8 u)."""
        _check_choice("Datapath", "ssm_impl", ssm_impl, SSM_IMPLS)
        return dataclasses.replace(self, ssm_impl=ssm_impl)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe description; `Datapath.from_dict(d.to_dict()) == d`."""
        data: dict[str, Any] = {name: getattr(self, name) for name in _DATAPATH_FIELDS}
        data["rounding"] = self.rounding.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Any) -> Datapath:
        """Inverse of `to_dict`; every field must be present, nothing else."""
        _check_keys("Datapath", data, (*_DATAPATH_FIELDS, "rounding"))
        values = {name: data[name] for name in _DATAPATH_FIELDS}
        return cls(**values, rounding=Rounding.from_dict(data["rounding"]))


def _check_keys(owner: str, data: Any, expected: tuple[str, ...]) -> None:
    if not isinstance(data, dict):
        raise DatapathError(f"{owner}.from_dict needs a dict, got {type(data).__name__}")
    missing = [key for key in expected if key not in data]
    unknown = sorted(str(key) for key in data if key not in expected)
    if missing or unknown:
        raise DatapathError(
            f"{owner}.from_dict: missing keys {missing}, unknown keys {unknown}; "
            f"expected exactly {list(expected)}"
        )

"""The seed system's mode environment variables, mapped to mode names once, at start-up.

quamba never reads environment variables in a forward pass. Users of the seed system select modes
with variables (seed-system.md §1.1, Appendix A); the seed code silently erased or ignored them.
Here they are read once by the CLI and either mapped to the mode they name, with a warning that
shows the `--mode` equivalent, or refused. They are never ignored silently.

Mapping (the seed's MODE_CONFIG): 2-0 = FLOAT_SIM_ASIC_INT8 + SSM_USE_CUDA_FOR_FP32;
2-1 = FLOAT_SIM_ASIC_INT8 + SSM_USE_PYTORCH_INT8; 2-2 = FLOAT_SIM_ASIC_INT8;
2-3 = FLOAT_SIM_ASIC_INT8 + CONV1D_MODE23_FP32; 2-4 = FLOAT_SIM_ASIC_INT8 + CONV1D_MODE24_FP32;
3 = CONV1D_MODE3_FP32; 4 = CONV1D_MODE24_FP32 + CONV1D_MODE4_SELECTIVE_GRID (refused unless a mode
"4" is registered); mode 0 sets no variable. `QUAMBA_MODE=<name>` names a mode directly.

Decision on `FP32_SSM_INPUT` (the Nov-7 "Mode 1"): refused, not mapped. What it computed (INT8 conv,
dequantised u, FP32 scan) is neither our mode 3 (dynamic conv input, true FP32 conv) nor the FP
model, and the seeds removed it as redundant with 3; guessing would run another datapath than the
one the user's old results measured. The message names 2-2, 3 and fp32 so the user picks one.
The Nov-6/7 float-sim switches (FLOAT_SIM_ASIC, FLOAT_SIM_BETTER_SCALE, FLOAT_SIM_ASIC_RESEARCH_SE,
YZ_CHECK_FLOAT_SIM) name datapaths quamba does not implement and are refused too.

Values: "1", "true", "yes", "on" (any case, surrounding spaces ignored) are true; "0", "false",
"no", "off" and "" are false, treated as unset but mentioned in the warning; anything else is refused.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from quamba_modes.registry import REGISTRY, ModeError, get_mode

TRUE_VALUES = ("1", "true", "yes", "on")
FALSE_VALUES = ("0", "false", "no", "off", "")

# The seed's MODE_CONFIG (seed-system.md §1.1): the variables each mode set to true.
LEGACY_MODE_FLAGS: dict[str, frozenset[str]] = {
    "2-0": frozenset({"FLOAT_SIM_ASIC_INT8", "SSM_USE_CUDA_FOR_FP32"}),
    "2-1": frozenset({"FLOAT_SIM_ASIC_INT8", "SSM_USE_PYTORCH_INT8"}),
    "2-2": frozenset({"FLOAT_SIM_ASIC_INT8"}),
    "2-3": frozenset({"FLOAT_SIM_ASIC_INT8", "CONV1D_MODE23_FP32"}),
    "2-4": frozenset({"FLOAT_SIM_ASIC_INT8", "CONV1D_MODE24_FP32"}),
    "3": frozenset({"CONV1D_MODE3_FP32"}),
    "4": frozenset({"CONV1D_MODE24_FP32", "CONV1D_MODE4_SELECTIVE_GRID"}),
}
MODE_FLAG_VARIABLES = tuple(sorted(set().union(*LEGACY_MODE_FLAGS.values())))

# Switches of removed seed modes: refused when true, with the reason.
RETIRED_FLAGS: dict[str, str] = {
    "FP32_SSM_INPUT": (
        "FP32_SSM_INPUT selected the seed system's Nov-7 'Mode 1' (INT8 conv, dequantised u, "
        "FP32 scan), removed by the seeds as redundant with mode 3; it is not mapped because no "
        "mode here computes exactly that. Unset it and choose: --mode 2-2 (INT8 conv, FP32 u on "
        "the INT8 grid, FP32 reference scan), --mode 3 (dynamic-scale conv input, true FP32 conv "
        "and SSM) or --mode fp32 (the unquantized model)"
    ),
    "FLOAT_SIM_ASIC": "FLOAT_SIM_ASIC selected the Nov-6 float simulation, which was removed",
    "FLOAT_SIM_BETTER_SCALE": (
        "FLOAT_SIM_BETTER_SCALE selected the Nov-6 scaled float simulation, which was removed"
    ),
    "FLOAT_SIM_ASIC_RESEARCH_SE": (
        "FLOAT_SIM_ASIC_RESEARCH_SE selected the Nov-7 dual-scale (SE) simulation, which was removed"
    ),
    "YZ_CHECK_FLOAT_SIM": "YZ_CHECK_FLOAT_SIM selected a Nov-6 float-sim check, which was removed",
}

# Seed debugging switches that select no mode: they have no effect here (said, not ignored).
NO_EFFECT_VARIABLES = (
    "QUICK_VERIFY",
    "DUAL_MODE_DEBUG",
    "SSM_DEBUG_MODE20",
    "SSM_DEBUG_MODE21",
    "SSM_DEBUG_MODE23",
    "SSM_USE_STATE_SCALE",
    "FLOAT_SIM_SCALE_FACTOR",
    "SAVE_INTERMEDIATE_VALUES",
    "INTERMEDIATE_VALUES_DIR",
    "DEBUG_MODE0_VS_MODE50",
    "DEBUG_MODE50_VS_MODE51",
)

# Every variable this module reads: the mode switches, QUAMBA_MODE, retired and no-effect ones.
LEGACY_VARIABLES = (*MODE_FLAG_VARIABLES, "QUAMBA_MODE", *RETIRED_FLAGS, *NO_EFFECT_VARIABLES)


@dataclass(frozen=True)
class _LegacyEnv:
    mode: str | None  # canonical registered name, or None
    assignments: str  # the variables that chose it, as NAME=value text
    warning: str | None


def _parse_flag(name: str, value: str) -> bool:
    text = value.strip().lower()
    if text in TRUE_VALUES:
        return True
    if text in FALSE_VALUES:
        return False
    raise ModeError(
        f"environment variable {name}={value!r} is not a boolean; true: "
        f"{', '.join(TRUE_VALUES)}; false: {', '.join(repr(v) for v in FALSE_VALUES)}"
    )


def _valid_combinations() -> str:
    return "; ".join(
        f"{name} = {' + '.join(sorted(flags))}" for name, flags in LEGACY_MODE_FLAGS.items()
    )


def _mode_from_flags(flags: frozenset[str], shown: str) -> str:
    for name, mode_flags in LEGACY_MODE_FLAGS.items():
        if flags == mode_flags:
            return name
    # No exact match: say whether the variables name no mode or several.
    candidates = [name for name, mode_flags in LEGACY_MODE_FLAGS.items() if mode_flags <= flags]
    maximal = [
        name
        for name in candidates
        if not any(LEGACY_MODE_FLAGS[name] < LEGACY_MODE_FLAGS[other] for other in candidates)
    ]
    if len(maximal) >= 2:
        problem = f"name different modes ({', '.join(maximal)})"
    else:
        problem = "name no mode"
    raise ModeError(
        f"the seed-system environment variables {shown} {problem}; the seed system's "
        f"combinations were: {_valid_combinations()} (mode 0: none). Unset them and use --mode"
    )


def _read_legacy(environ: Mapping[str, str] | None) -> _LegacyEnv:
    env = os.environ if environ is None else environ
    true_flags: list[str] = []
    mentions: list[str] = []  # variables set to a false value
    for name in (*MODE_FLAG_VARIABLES, *RETIRED_FLAGS):
        if name not in env:
            continue
        if _parse_flag(name, env[name]):
            if name in RETIRED_FLAGS:
                raise ModeError(RETIRED_FLAGS[name])
            true_flags.append(name)
        else:
            mentions.append(f"{name}={env[name]!r}")

    flag_mode = None
    flags_shown = ", ".join(f"{name}={env[name]}" for name in true_flags)
    if true_flags:
        flag_mode = _mode_from_flags(frozenset(true_flags), flags_shown)

    named_mode = None
    if "QUAMBA_MODE" in env:
        value = env["QUAMBA_MODE"].strip()
        if value:
            try:
                named_mode = get_mode(value).name
            except ModeError as exc:
                raise ModeError(f"environment variable QUAMBA_MODE={value!r}: {exc}") from None
        else:
            mentions.append(f"QUAMBA_MODE={env['QUAMBA_MODE']!r}")

    if flag_mode is not None and named_mode is not None and flag_mode != named_mode:
        raise ModeError(
            f"the seed-system environment variables contradict each other: {flags_shown} "
            f"select mode {flag_mode}, QUAMBA_MODE={env['QUAMBA_MODE']} selects mode "
            f"{named_mode}; unset them and use --mode"
        )
    if flag_mode is not None and flag_mode not in REGISTRY:
        raise ModeError(
            f"the seed-system environment variables {flags_shown} select the seed system's mode "
            f"{flag_mode}, which is not a registered mode here; registered: {', '.join(REGISTRY)}"
        )

    mode = flag_mode or named_mode
    shown_parts = [flags_shown] if flags_shown else []
    if named_mode is not None:
        shown_parts.append(f"QUAMBA_MODE={env['QUAMBA_MODE']}")
    assignments = ", ".join(shown_parts)

    lines = []
    if mode is not None:
        names = ", ".join(name for name in (*true_flags, "QUAMBA_MODE") if name in env)
        lines.append(
            f"seed-system environment variables {assignments} select mode {mode}; quamba reads "
            f"them once at start-up, never in a forward pass. Equivalent: --mode {mode} "
            f"(then unset {names})"
        )
    if mentions:
        lines.append(
            f"seed-system environment variables set to false, treated as unset: {', '.join(mentions)}"
        )
    no_effect = [name for name in NO_EFFECT_VARIABLES if name in env]
    if no_effect:
        lines.append(
            f"seed-system debugging variables have no effect in quamba: {', '.join(no_effect)}"
        )
    return _LegacyEnv(mode, assignments, "\n".join(lines) or None)


def legacy_mode_from_env(
    environ: Mapping[str, str] | None = None,
) -> tuple[str | None, str | None]:
    """(mode name or None, warning text or None) from the seed system's variables.

    `environ` defaults to `os.environ`. Raises ModeError for combinations that name no mode or
    several, for contradicting variables, for retired switches and for values that are not booleans.
    """
    legacy = _read_legacy(environ)
    return legacy.mode, legacy.warning


def check_against_cli(
    cli_mode: str | None,
    environ: Mapping[str, str] | None = None,
    *,
    default: str | None = None,
) -> tuple[str | None, str | None]:
    """The mode to run given `--mode` (or None when absent) and the environment: (name, warning).

    --mode given: it wins when the variables name no mode or the same one; when they name another
    mode, ModeError. --mode absent: the variables' mode, with a warning showing `--mode X`; when
    they name none, `default` (None if not given).
    """
    legacy = _read_legacy(environ)
    if cli_mode is None:
        if legacy.mode is not None:
            return legacy.mode, legacy.warning
        return (None if default is None else get_mode(default).name), legacy.warning
    chosen = get_mode(cli_mode).name
    if legacy.mode is not None and legacy.mode != chosen:
        raise ModeError(
            f"--mode {chosen} contradicts the seed-system environment variables "
            f"{legacy.assignments}, which select mode {legacy.mode}; unset them, or run "
            f"--mode {legacy.mode}"
        )
    return chosen, legacy.warning

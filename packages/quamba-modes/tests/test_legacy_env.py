"""The seed system's mode variables: mapped with a warning, or refused; never ignored silently."""

from __future__ import annotations

import random

import pytest

from quamba_modes.legacy_env import check_against_cli, legacy_mode_from_env
from quamba_modes.registry import ModeError

# seed-system.md §1.1, MODE_CONFIG, written out independently.
DOCUMENTED = {
    "2-0": ("FLOAT_SIM_ASIC_INT8", "SSM_USE_CUDA_FOR_FP32"),
    "2-1": ("FLOAT_SIM_ASIC_INT8", "SSM_USE_PYTORCH_INT8"),
    "2-2": ("FLOAT_SIM_ASIC_INT8",),
    "2-3": ("FLOAT_SIM_ASIC_INT8", "CONV1D_MODE23_FP32"),
    "2-4": ("FLOAT_SIM_ASIC_INT8", "CONV1D_MODE24_FP32"),
    "3": ("CONV1D_MODE3_FP32",),
}
TRUE_SPELLINGS = ["1", "true", "TRUE", "True", "yes", "YES", "on", " On ", "true\n"]
FALSE_SPELLINGS = ["0", "false", "FALSE", "no", "off", "", "  "]


def _env(flags, rng: random.Random, **extra) -> dict[str, str]:
    env = {"PATH": "/usr/bin", "HOME": "/root"}  # unrelated variables are ignored
    env.update({flag: rng.choice(TRUE_SPELLINGS) for flag in flags})
    env.update(extra)
    return env


def test_nothing_set_names_nothing():
    assert legacy_mode_from_env({}) == (None, None)
    assert legacy_mode_from_env({"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0"}) == (None, None)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("mode", list(DOCUMENTED))
def test_each_documented_combination_maps_with_a_warning(mode, seed):
    env = _env(DOCUMENTED[mode], random.Random(seed))
    name, warning = legacy_mode_from_env(env)
    assert name == mode
    assert f"--mode {mode}" in warning
    for flag in DOCUMENTED[mode]:
        assert flag in warning
    assert "never in a forward pass" in warning


@pytest.mark.parametrize("value", FALSE_SPELLINGS)
def test_false_values_are_unset_but_mentioned(value):
    name, warning = legacy_mode_from_env({"FLOAT_SIM_ASIC_INT8": value})
    assert name is None
    assert "FLOAT_SIM_ASIC_INT8" in warning and "treated as unset" in warning


def test_false_flag_beside_a_true_one_only_drops_out():
    env = {"FLOAT_SIM_ASIC_INT8": "1", "SSM_USE_CUDA_FOR_FP32": "false"}
    name, warning = legacy_mode_from_env(env)
    assert name == "2-2"
    assert "SSM_USE_CUDA_FOR_FP32='false'" in warning and "--mode 2-2" in warning


@pytest.mark.parametrize("value", ["2", "maybe", "t", "enabled", "-1"])
def test_non_boolean_values_are_refused(value):
    with pytest.raises(ModeError, match="not a boolean") as info:
        legacy_mode_from_env({"CONV1D_MODE3_FP32": value})
    assert "CONV1D_MODE3_FP32" in str(info.value)


@pytest.mark.parametrize(
    "flags",
    [
        ("SSM_USE_CUDA_FOR_FP32",),
        ("SSM_USE_PYTORCH_INT8",),
        ("CONV1D_MODE23_FP32",),
        ("SSM_USE_PYTORCH_INT8", "CONV1D_MODE23_FP32"),
        ("CONV1D_MODE4_SELECTIVE_GRID",),
        ("FLOAT_SIM_ASIC_INT8", "SSM_USE_CUDA_FOR_FP32", "CONV1D_MODE4_SELECTIVE_GRID"),
    ],
)
def test_combinations_naming_no_mode_are_refused(flags):
    with pytest.raises(ModeError, match="name no mode") as info:
        legacy_mode_from_env(_env(flags, random.Random(0)))
    message = str(info.value)
    for flag in flags:
        assert flag in message
    assert "--mode" in message and "2-3 = CONV1D_MODE23_FP32 + FLOAT_SIM_ASIC_INT8" in message


@pytest.mark.parametrize(
    ("flags", "modes"),
    [
        (("FLOAT_SIM_ASIC_INT8", "SSM_USE_CUDA_FOR_FP32", "SSM_USE_PYTORCH_INT8"), "2-0, 2-1"),
        (("FLOAT_SIM_ASIC_INT8", "CONV1D_MODE23_FP32", "CONV1D_MODE24_FP32"), "2-3, 2-4"),
        (("FLOAT_SIM_ASIC_INT8", "CONV1D_MODE3_FP32"), "2-2, 3"),
    ],
)
def test_combinations_naming_several_modes_are_refused(flags, modes):
    with pytest.raises(ModeError, match="name different modes") as info:
        legacy_mode_from_env(_env(flags, random.Random(1)))
    assert f"({modes})" in str(info.value)
    for flag in flags:
        assert flag in str(info.value)


def test_seed_mode_4_is_refused_as_not_registered():
    env = {"CONV1D_MODE24_FP32": "1", "CONV1D_MODE4_SELECTIVE_GRID": "1"}
    with pytest.raises(ModeError, match="mode 4, which is not a registered mode"):
        legacy_mode_from_env(env)


@pytest.mark.parametrize(("value", "mode"), [("2-4", "2-4"), (" fp32 ", "fp32"), ("0", "0")])
def test_quamba_mode_is_honoured_with_a_warning(value, mode):
    name, warning = legacy_mode_from_env({"QUAMBA_MODE": value})
    assert name == mode
    assert "QUAMBA_MODE" in warning and f"--mode {mode}" in warning


def test_quamba_mode_names_are_checked():
    with pytest.raises(ModeError, match=r"QUAMBA_MODE='1'.*'3'.*fp32"):
        legacy_mode_from_env({"QUAMBA_MODE": "1"})
    with pytest.raises(ModeError, match="unknown mode 'bogus'; valid modes: 0, 2-0"):
        legacy_mode_from_env({"QUAMBA_MODE": "bogus"})
    name, warning = legacy_mode_from_env({"QUAMBA_MODE": ""})
    assert name is None and "QUAMBA_MODE" in warning


def test_quamba_mode_agreeing_with_flags_is_accepted():
    env = {"QUAMBA_MODE": "2-3", "FLOAT_SIM_ASIC_INT8": "1", "CONV1D_MODE23_FP32": "on"}
    name, warning = legacy_mode_from_env(env)
    assert name == "2-3" and "QUAMBA_MODE=2-3" in warning


def test_quamba_mode_contradicting_flags_is_refused():
    env = {"QUAMBA_MODE": "2-4", "FLOAT_SIM_ASIC_INT8": "1", "SSM_USE_CUDA_FOR_FP32": "1"}
    with pytest.raises(ModeError, match="contradict") as info:
        legacy_mode_from_env(env)
    assert "2-0" in str(info.value) and "2-4" in str(info.value)


def test_fp32_ssm_input_mode_1_is_refused_with_the_alternatives():
    with pytest.raises(ModeError) as info:
        legacy_mode_from_env({"FP32_SSM_INPUT": "true"})
    message = str(info.value)
    for fragment in ["Mode 1", "--mode 2-2", "--mode 3", "--mode fp32", "FP32_SSM_INPUT"]:
        assert fragment in message
    # Even beside a valid selection: the user's intent is ambiguous.
    with pytest.raises(ModeError, match="FP32_SSM_INPUT"):
        legacy_mode_from_env({"FP32_SSM_INPUT": "1", "CONV1D_MODE3_FP32": "1"})
    name, warning = legacy_mode_from_env({"FP32_SSM_INPUT": "0"})
    assert name is None and "FP32_SSM_INPUT" in warning


@pytest.mark.parametrize(
    "flag",
    [
        "FLOAT_SIM_ASIC",
        "FLOAT_SIM_BETTER_SCALE",
        "FLOAT_SIM_ASIC_RESEARCH_SE",
        "YZ_CHECK_FLOAT_SIM",
    ],
)
def test_retired_float_sim_switches_are_refused(flag):
    with pytest.raises(ModeError, match=f"{flag} selected .* removed"):
        legacy_mode_from_env({flag: "1"})


def test_debugging_variables_are_reported_as_without_effect():
    name, warning = legacy_mode_from_env({"QUICK_VERIFY": "1", "DUAL_MODE_DEBUG": "true"})
    assert name is None
    assert "QUICK_VERIFY" in warning and "DUAL_MODE_DEBUG" in warning
    assert "no effect" in warning


def test_os_environ_is_the_default(monkeypatch):
    for flag in ("FLOAT_SIM_ASIC_INT8", "SSM_USE_PYTORCH_INT8", "QUAMBA_MODE"):
        monkeypatch.delenv(flag, raising=False)
    monkeypatch.setenv("FLOAT_SIM_ASIC_INT8", "1")
    monkeypatch.setenv("SSM_USE_PYTORCH_INT8", "1")
    assert legacy_mode_from_env()[0] == "2-1"
    assert check_against_cli(None)[0] == "2-1"


# ---------------------------------------------------------------- against --mode


@pytest.mark.parametrize("mode", list(DOCUMENTED))
def test_env_alone_selects_its_mode_showing_the_option(mode):
    name, warning = check_against_cli(None, _env(DOCUMENTED[mode], random.Random(2)))
    assert name == mode and f"--mode {mode}" in warning


@pytest.mark.parametrize("mode", list(DOCUMENTED))
def test_cli_and_env_naming_the_same_mode_agree(mode):
    name, warning = check_against_cli(mode, _env(DOCUMENTED[mode], random.Random(3)))
    assert name == mode and warning is not None


@pytest.mark.parametrize("env_mode", list(DOCUMENTED))
@pytest.mark.parametrize("cli_mode", ["0", "2-2", "fp32"])
def test_cli_contradicting_env_is_refused(cli_mode, env_mode):
    env = _env(DOCUMENTED[env_mode], random.Random(4))
    if cli_mode == env_mode:
        assert check_against_cli(cli_mode, env)[0] == cli_mode
        return
    with pytest.raises(ModeError, match="contradicts") as info:
        check_against_cli(cli_mode, env)
    message = str(info.value)
    assert f"--mode {cli_mode}" in message and f"--mode {env_mode}" in message
    for flag in DOCUMENTED[env_mode]:
        assert flag in message


def test_cli_contradicting_quamba_mode_is_refused():
    with pytest.raises(ModeError, match="QUAMBA_MODE=3"):
        check_against_cli("2-4", {"QUAMBA_MODE": "3"})


def test_cli_alone_and_defaults():
    assert check_against_cli("2-1", {}) == ("2-1", None)
    assert check_against_cli(" FP16 ", {}) == ("fp16", None)
    assert check_against_cli(None, {}) == (None, None)
    assert check_against_cli(None, {}, default="0") == ("0", None)
    name, warning = check_against_cli("3", {"FLOAT_SIM_ASIC_INT8": "off"})
    assert name == "3" and "FLOAT_SIM_ASIC_INT8" in warning
    with pytest.raises(ModeError, match="'3'"):
        check_against_cli("1", {})
    with pytest.raises(ModeError, match="unknown mode"):
        check_against_cli(None, {}, default="9")

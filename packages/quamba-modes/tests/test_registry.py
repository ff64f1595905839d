"""The mode registry and the Datapath it is built from: every mode row by row against modes.md."""

from __future__ import annotations

import ast
import dataclasses
import itertools
import json
import random
from pathlib import Path

import pytest

import quamba_layers
from quamba_layers.datapath import Datapath, DatapathError, Rounding
from quamba_modes.registry import (
    BUILTIN_MODE_NAMES,
    REGISTRY,
    Mode,
    ModeError,
    Relation,
    get_mode,
    parse_modes,
    register_mode,
    unregister_mode,
)
from quamba_modes.resolve import resolve_mode

# modes.md, "The modes (intended semantics)", written out independently of the registry:
# (conv input, conv output, x_proj input, SSM input u, SSM implementation, gate z, linears)
EXPECTED_ROWS = {
    "0": ("int8_static", "int8", "int8 codes", "int8", "kernel_int8", "int8", "int8"),
    "2-0": (
        "int8_static",
        "fp32_grid",
        "int8 codes",
        "requant_int8",
        "kernel_int8",
        "int8",
        "int8",
    ),
    "2-1": ("int8_static", "int8", "int8 codes", "int8", "reference", "int8", "int8"),
    "2-2": ("int8_static", "fp32_grid", "int8 codes", "fp32_grid", "reference", "int8", "int8"),
    "2-3": ("int8_static", "fp32", "Q8(v, s_u)", "requant_int8", "reference", "int8", "int8"),
    "2-4": ("int8_static", "fp32", "Q8(v, s_u)", "fp32", "reference", "int8", "int8"),
    "3": ("int8_dynamic", "fp32", "Q8(v, s_u)", "fp32", "reference", "fp32", "int8"),
}
EXPECTED_FLOAT = {"fp16": "float16", "fp32": "float32"}
# design.md, "Rounding": upstream's rule per site.
DEFAULT_ROUNDING = {
    "norm": "half_even",
    "gemm": "half_even",
    "conv": "half_away",
    "ssm_state": "half_away",
    "hadamard": "half_away",
    "requant": "half_even",
}
# modes.md, "Expected relations": bit-identical pairs.
EXPECTED_EQUAL = {"2-0": "0", "2-2": "2-1"}


def _row(datapath: Datapath) -> tuple[str, ...]:
    return (
        datapath.conv_input,
        datapath.conv_output,
        datapath.x_proj_input,
        datapath.ssm_input,
        datapath.ssm_impl,
        datapath.gate,
        datapath.linears,
    )


# ---------------------------------------------------------------- the built-in modes


def test_registry_holds_exactly_the_intended_modes_in_order():
    assert tuple(REGISTRY)[: len(BUILTIN_MODE_NAMES)] == BUILTIN_MODE_NAMES
    assert BUILTIN_MODE_NAMES == ("0", "2-0", "2-1", "2-2", "2-3", "2-4", "3", "fp16", "fp32")


@pytest.mark.parametrize("name", list(EXPECTED_ROWS))
def test_quantized_mode_matches_modes_md_row(name):
    mode = get_mode(name)
    assert mode.name == name
    assert mode.kind == "quantized" and mode.is_quantized
    assert mode.float_dtype is None
    assert _row(mode.datapath) == EXPECTED_ROWS[name]
    assert mode.datapath.rounding.to_dict() == DEFAULT_ROUNDING
    assert mode.title and mode.description.endswith(".")


@pytest.mark.parametrize("name", list(EXPECTED_FLOAT))
def test_float_modes_are_the_unquantized_model(name):
    mode = get_mode(name)
    assert mode.kind == "float" and not mode.is_quantized
    assert mode.datapath is None
    assert mode.float_dtype == EXPECTED_FLOAT[name]
    assert mode.intent == ()


@pytest.mark.parametrize("name", BUILTIN_MODE_NAMES)
def test_expected_relations(name):
    mode = get_mode(name)
    assert mode.expected_equal_to == EXPECTED_EQUAL.get(name)
    for relation in mode.intent:
        assert relation.other in REGISTRY and relation.other != name


def test_relations_of_the_simulation_modes():
    kinds = {name: {(r.kind, r.other) for r in get_mode(name).intent} for name in REGISTRY}
    assert kinds["2-1"] == {("within_tolerance", "0")}
    assert kinds["2-3"] == {("differs_at_ties", "2-1")}
    assert kinds["2-4"] == {("differs_only_in", "2-2")}
    assert kinds["3"] == {("differs_only_in", "2-4")}
    assert kinds["0"] == set()


# ---------------------------------------------------------------- names


@pytest.mark.parametrize("name", ["1", " 1 "])
def test_mode_1_fails_naming_3_and_fp32(name):
    with pytest.raises(ModeError) as info:
        get_mode(name)
    message = str(info.value)
    assert "'1'" in message and "'3'" in message and "--mode 3" in message
    assert "fp32" in message and "removed" in message


@pytest.mark.parametrize("name", ["2-5", "4", "5-1", "fp64", "", "mode0", "all", "2_1"])
def test_unknown_mode_lists_the_valid_ones(name):
    with pytest.raises(ModeError) as info:
        get_mode(name)
    message = str(info.value)
    assert "unknown mode" in message
    for valid in BUILTIN_MODE_NAMES:
        assert valid in message


def test_get_mode_normalises_case_and_spaces_and_rejects_non_strings():
    assert get_mode(" FP32 ") is REGISTRY["fp32"]
    assert get_mode(REGISTRY["2-4"]) is REGISTRY["2-4"]
    with pytest.raises(TypeError, match="must be a str"):
        get_mode(3)


def test_registry_view_is_read_only():
    with pytest.raises(TypeError):
        REGISTRY["x"] = REGISTRY["0"]


# ---------------------------------------------------------------- parse_modes


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("0,2-1", ("0", "2-1")),
        (" 2-4 , 3,fp32", ("2-4", "3", "fp32")),
        ("all", ("0", "2-0", "2-1", "2-2", "2-3", "2-4", "3")),
        ("all,fp32", ("0", "2-0", "2-1", "2-2", "2-3", "2-4", "3", "fp32")),
        ("fp16,ALL", ("fp16", "0", "2-0", "2-1", "2-2", "2-3", "2-4", "3")),
        ("2-2,2-2,0", ("2-2", "0")),
        (["3", "0"], ("3", "0")),
    ],
)
def test_parse_modes(spec, expected):
    assert tuple(mode.name for mode in parse_modes(spec)) == expected


@pytest.mark.parametrize("spec", ["", " ", "0,,2-1", "0,"])
def test_parse_modes_rejects_empty_entries(spec):
    with pytest.raises(ModeError, match="empty mode"):
        parse_modes(spec)


def test_parse_modes_propagates_name_errors():
    with pytest.raises(ModeError, match="'3'"):
        parse_modes("0,1")
    with pytest.raises(ModeError, match="unknown mode"):
        parse_modes("0,2-9")
    with pytest.raises(TypeError):
        parse_modes([0, 1])


# ---------------------------------------------------------------- open registry


def _made_up_mode(name: str = "5-1") -> Mode:
    # Like the seeds' 5-1: true FP32 conv output straight into the scan, on the GPU sim scan.
    return Mode(
        name,
        "Made-up FP32 u on the sim scan",
        "A test mode: true FP32 conv output into the GPU simulation scan.",
        "quantized",
        datapath=Datapath(conv_output="fp32", ssm_input="fp32", ssm_impl="sim_kernel"),
        intent=(Relation("differs_only_in", "2-4", "the SSM implementation"),),
    )


@pytest.fixture
def made_up_mode():
    mode = register_mode(_made_up_mode())
    yield mode
    unregister_mode(mode.name)


def test_register_mode_adds_one_entry(made_up_mode):
    assert get_mode("5-1") is made_up_mode
    assert tuple(REGISTRY)[-1] == "5-1"
    assert "5-1" in [mode.name for mode in parse_modes("all")]
    resolved = resolve_mode("5-1", device="cuda", kernels_available=True)
    assert resolved.datapath.ssm_impl == "sim_kernel"
    resolved = resolve_mode("5-1", device="cpu")
    assert resolved.datapath.ssm_impl == "sim_kernel" and resolved.notes
    with pytest.raises(ModeError, match="already registered"):
        register_mode(_made_up_mode())


def test_unregister_restores_the_registry():
    before = tuple(REGISTRY)
    register_mode(_made_up_mode("7-0"))
    unregister_mode("7-0")
    assert tuple(REGISTRY) == before
    with pytest.raises(ModeError, match="not registered"):
        unregister_mode("7-0")
    with pytest.raises(ModeError, match="built in"):
        unregister_mode("0")


@pytest.mark.parametrize(
    ("name", "match"),
    [("1", "removed"), ("all", "reserved"), ("0", "already registered"), ("fp32", "already")],
)
def test_register_mode_refuses_reserved_and_duplicate_names(name, match):
    with pytest.raises(ModeError, match=match):
        register_mode(dataclasses.replace(_made_up_mode(), name=name))


@pytest.mark.parametrize("name", ["Mode5", "5 1", "-5", "5,1", ""])
def test_mode_names_are_checked(name):
    with pytest.raises(ModeError, match="mode name"):
        _made_up_mode(name)


def test_register_mode_checks_relations_and_types():
    bad = dataclasses.replace(_made_up_mode("8-0"), intent=(Relation("bit_identical", "9-9"),))
    with pytest.raises(ModeError, match="unknown mode '9-9'"):
        register_mode(bad)
    assert "8-0" not in REGISTRY
    with pytest.raises(TypeError):
        register_mode("8-0")
    with pytest.raises(ModeError, match="relation kind"):
        Relation("equal", "0")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "quantized", "datapath": None}, "needs a Datapath"),
        ({"kind": "float", "float_dtype": "float32"}, "no quantized datapath"),
        ({"kind": "float", "datapath": None, "float_dtype": "bfloat16"}, "float_dtype"),
        ({"kind": "int4"}, "kind"),
        ({"float_dtype": "float32"}, "only for float modes"),
        ({"intent": [Relation("bit_identical", "0")]}, "tuple of Relation"),
    ],
)
def test_mode_rejects_inconsistent_fields(kwargs, match):
    with pytest.raises(ModeError, match=match):
        dataclasses.replace(_made_up_mode(), **kwargs)


@pytest.mark.parametrize("name", BUILTIN_MODE_NAMES)
def test_mode_json_round_trip_is_exact(name):
    mode = get_mode(name)
    data = json.loads(json.dumps(mode.to_dict()))
    assert Mode.from_dict(data) == mode
    if mode.datapath is not None:
        assert data["x_proj_input"] == EXPECTED_ROWS[name][2]


def test_mode_from_dict_reports_malformed_input():
    data = get_mode("2-3").to_dict()
    del data["kind"]
    with pytest.raises(ModeError, match="malformed"):
        Mode.from_dict(data)
    data = get_mode("2-3").to_dict()
    data["datapath"]["ssm_input"] = "int8"
    with pytest.raises(ModeError, match="inconsistent datapath"):
        Mode.from_dict(data)


# ---------------------------------------------------------------- Datapath

CONV_INPUTS = ("int8_static", "int8_dynamic")
CONV_OUTPUTS = ("int8", "fp32_grid", "fp32")
SSM_INPUTS = ("int8", "fp32_grid", "requant_int8", "fp32")
SSM_IMPLS = ("kernel_int8", "reference", "sim_kernel")
GATES = ("int8", "fp32")
# Independent oracle: which conv outputs can feed which SSM inputs, which SSM inputs the INT8
# kernel takes, and which (conv input, gate, conv output) go together.
FEEDS = {
    ("int8", "int8"),
    ("int8", "fp32_grid"),
    ("fp32_grid", "fp32_grid"),
    ("fp32_grid", "requant_int8"),
    ("fp32", "requant_int8"),
    ("fp32", "fp32"),
}
KERNEL_INT8_TAKES = {"int8", "requant_int8"}


def _oracle_valid(conv_input, conv_output, ssm_input, ssm_impl, gate):
    if (conv_output, ssm_input) not in FEEDS:
        return False
    if ssm_impl == "kernel_int8" and ssm_input not in KERNEL_INT8_TAKES:
        return False
    if conv_input == "int8_dynamic":
        return gate == "fp32" and conv_output == "fp32"
    return gate == "int8"


ALL_COMBINATIONS = list(itertools.product(CONV_INPUTS, CONV_OUTPUTS, SSM_INPUTS, SSM_IMPLS, GATES))


@pytest.mark.parametrize("combination", ALL_COMBINATIONS, ids="-".join)
def test_datapath_validation_matches_oracle(combination):
    conv_input, conv_output, ssm_input, ssm_impl, gate = combination
    kwargs = dict(
        conv_input=conv_input,
        conv_output=conv_output,
        ssm_input=ssm_input,
        ssm_impl=ssm_impl,
        gate=gate,
    )
    if _oracle_valid(*combination):
        datapath = Datapath(**kwargs)
        assert datapath.problems() == []
        datapath.validate()
    else:
        with pytest.raises(DatapathError, match="inconsistent datapath"):
            Datapath(**kwargs)


def test_every_builtin_datapath_is_valid_per_oracle():
    valid = [c for c in ALL_COMBINATIONS if _oracle_valid(*c)]
    assert len(valid) > 7  # the oracle is not trivially narrow
    for name in EXPECTED_ROWS:
        d = get_mode(name).datapath
        assert (d.conv_input, d.conv_output, d.ssm_input, d.ssm_impl, d.gate) in valid


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"conv_output": "fp32_grid", "ssm_input": "int8"}, ["ssm_input 'int8'", "conv_output"]),
        ({"conv_output": "int8", "ssm_input": "fp32"}, ["ssm_input 'fp32'", "'fp32_grid'"]),
        ({"conv_output": "fp32", "ssm_input": "fp32_grid"}, ["ssm_input 'fp32_grid'"]),
        ({"conv_output": "int8", "ssm_input": "requant_int8"}, ["requant_int8", "'int8'"]),
        (
            {"conv_output": "fp32", "ssm_input": "fp32", "ssm_impl": "kernel_int8"},
            ["kernel_int8", "INT8 u"],
        ),
        ({"conv_input": "int8_dynamic", "conv_output": "int8", "ssm_input": "int8"}, ["dynamic"]),
        ({"conv_input": "int8_dynamic", "conv_output": "fp32", "ssm_input": "fp32"}, ["gate"]),
        ({"gate": "fp32", "conv_output": "fp32", "ssm_input": "fp32"}, ["gate 'fp32'"]),
    ],
)
def test_datapath_errors_say_what_is_wrong(kwargs, words):
    full = {"ssm_impl": "reference", **kwargs}
    with pytest.raises(DatapathError) as info:
        Datapath(**full)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("conv_input", "int8"),
        ("conv_output", "float32"),
        ("ssm_input", "INT8"),
        ("ssm_impl", "kernel"),
        ("gate", "fp16"),
        ("linears", "fp32"),
        ("ssm_impl", None),
    ],
)
def test_datapath_rejects_unknown_values_listing_accepted(field, value):
    kwargs = {"conv_output": "int8", "ssm_input": "int8", "ssm_impl": "reference", field: value}
    with pytest.raises(DatapathError, match="expected one of"):
        Datapath(**kwargs)


def test_rounding_defaults_and_errors():
    assert Rounding().to_dict() == DEFAULT_ROUNDING
    with pytest.raises(DatapathError, match="half_away, half_even"):
        Rounding(conv="nearest")
    with pytest.raises(DatapathError, match="expected one of"):
        Rounding.uniform("rne")
    with pytest.raises(DatapathError, match="must be a Rounding"):
        Datapath(conv_output="int8", ssm_input="int8", ssm_impl="reference", rounding={})


@pytest.mark.parametrize("rule", ["half_away", "half_even"])
@pytest.mark.parametrize("name", list(EXPECTED_ROWS))
def test_with_rounding_changes_only_rounding(name, rule):
    before = get_mode(name).datapath
    after = before.with_rounding(rule)
    assert set(after.rounding.to_dict().values()) == {rule}
    assert _row(after) == _row(before)
    assert before.rounding.to_dict() == DEFAULT_ROUNDING  # frozen: the original is untouched


def test_with_ssm_impl_validates():
    mode_24 = get_mode("2-4").datapath
    assert mode_24.with_ssm_impl("sim_kernel").ssm_impl == "sim_kernel"
    with pytest.raises(DatapathError, match="kernel_int8"):
        mode_24.with_ssm_impl("kernel_int8")
    with pytest.raises(DatapathError, match="expected one of"):
        mode_24.with_ssm_impl("cuda")
    assert get_mode("2-3").datapath.with_ssm_impl("kernel_int8").ssm_impl == "kernel_int8"


def test_datapath_is_frozen():
    datapath = get_mode("0").datapath
    with pytest.raises(dataclasses.FrozenInstanceError):
        datapath.ssm_impl = "reference"
    with pytest.raises(dataclasses.FrozenInstanceError):
        datapath.rounding.conv = "half_even"
    assert hash(datapath) == hash(dataclasses.replace(datapath))


def test_datapath_json_round_trip_random_roundings():
    rng = random.Random(1234)
    valid = [c for c in ALL_COMBINATIONS if _oracle_valid(*c)]
    for _ in range(200):
        conv_input, conv_output, ssm_input, ssm_impl, gate = rng.choice(valid)
        rounding = Rounding(
            **{site: rng.choice(["half_away", "half_even"]) for site in DEFAULT_ROUNDING}
        )
        datapath = Datapath(
            conv_input=conv_input,
            conv_output=conv_output,
            ssm_input=ssm_input,
            ssm_impl=ssm_impl,
            gate=gate,
            rounding=rounding,
        )
        text = json.dumps(datapath.to_dict())
        back = Datapath.from_dict(json.loads(text))
        assert back == datapath
        assert json.dumps(back.to_dict()) == text


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda d: d.pop("gate"), "missing keys \\['gate'\\]"),
        (lambda d: d.update(extra=1), "unknown keys \\['extra'\\]"),
        (lambda d: d["rounding"].pop("requant"), "missing keys \\['requant'\\]"),
        (lambda d: d.update(conv_output="fp32"), "inconsistent"),
        (lambda d: d["rounding"].update(norm="up"), "expected one of"),
    ],
)
def test_datapath_from_dict_is_strict(mutate, match):
    data = get_mode("2-1").datapath.to_dict()
    mutate(data)
    with pytest.raises(DatapathError, match=match):
        Datapath.from_dict(data)
    with pytest.raises(DatapathError, match="needs a dict"):
        Datapath.from_dict([("conv_output", "int8")])


# ---------------------------------------------------------------- layers never see mode names

_LAYERS_DIR = Path(quamba_layers.__file__).parent
# Mode names that cannot be mistaken for other strings in layer code.
_DISTINCTIVE_NAMES = {name for name in BUILTIN_MODE_NAMES if "-" in name}


def test_datapath_module_imports_no_torch_at_module_level():
    tree = ast.parse((_LAYERS_DIR / "datapath.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Import):
            assert all(not alias.name.startswith("torch") for alias in node.names)
        if isinstance(node, ast.ImportFrom):
            assert not (node.module or "").startswith("torch")


def test_layer_sources_hold_no_mode_names():
    sources = sorted(_LAYERS_DIR.rglob("*.py"))
    assert sources  # at least datapath.py: the scan looks somewhere
    for path in sources:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert node.value.strip() not in _DISTINCTIVE_NAMES, (
                    f"{path}:{node.lineno} holds mode name {node.value!r}: layers must read the "
                    "Datapath, never branch on mode names"
                )

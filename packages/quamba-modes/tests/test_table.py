"""`quamba-eval modes`: the stage-by-stage table and the JSON descriptions."""

from __future__ import annotations

import json

import pytest

from quamba_layers.datapath import Datapath
from quamba_modes.registry import REGISTRY, Mode, ModeError, get_mode
from quamba_modes.resolve import resolve_mode
from quamba_modes.table import modes_json, modes_table

HEADER = [
    "mode",
    "conv input",
    "conv output",
    "x_proj input",
    "SSM input u",
    "SSM implementation",
    "gate z",
    "linears",
    "rounding",
]
# modes.md table rows, independently: conv in, conv out, x_proj in, u, SSM impl, gate, linears.
EXPECTED = {
    "0": ["int8_static", "int8", "int8 codes", "int8", "kernel_int8", "int8", "int8"],
    "2-0": [
        "int8_static",
        "fp32_grid",
        "int8 codes",
        "requant_int8",
        "kernel_int8",
        "int8",
        "int8",
    ],
    "2-1": ["int8_static", "int8", "int8 codes", "int8", "reference", "int8", "int8"],
    "2-2": ["int8_static", "fp32_grid", "int8 codes", "fp32_grid", "reference", "int8", "int8"],
    "2-3": ["int8_static", "fp32", "Q8(v, s_u)", "requant_int8", "reference", "int8", "int8"],
    "2-4": ["int8_static", "fp32", "Q8(v, s_u)", "fp32", "reference", "int8", "int8"],
    "3": ["int8_dynamic", "fp32", "Q8(v, s_u)", "fp32", "reference", "fp32", "int8"],
    "fp16": ["float16"] * 7,
    "fp32": ["float32"] * 7,
}
# Sites norm/gemm/conv/ssm_state/hadamard/requant; A = half_away, E = half_even (upstream rules).
DEFAULT_ROUNDING_CELL = "E/E/A/A/A/E"


def _parse(table: str) -> tuple[list[str], dict[str, list[str]]]:
    lines = [line for line in table.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert set(lines[1]) <= {"|", "-"}
    rows = {}
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert len(cells) == len(header)
        rows[cells[0]] = cells[1:]
    return header, rows


def test_table_has_a_row_per_registered_mode_matching_modes_md():
    header, rows = _parse(modes_table())
    assert header == HEADER
    assert list(rows) == list(REGISTRY)
    for name, cells in rows.items():
        assert cells[:-1] == EXPECTED[name]
        expected_rounding = "-" if name.startswith("fp") else DEFAULT_ROUNDING_CELL
        assert cells[-1] == expected_rounding


def test_table_is_aligned_and_has_a_legend():
    text = modes_table()
    table_lines = [line for line in text.splitlines() if line.startswith("|")]
    assert len({len(line) for line in table_lines}) == 1
    after_table = text.split("\n\n", 1)[1]
    for value in ["int8_dynamic", "fp32_grid", "requant_int8", "sim_kernel", "half_away"]:
        assert value in after_table
    for mode in REGISTRY.values():
        assert f"- {mode.name}: {mode.title}. {mode.description}" in after_table


@pytest.mark.parametrize(
    ("rule", "cell"), [("half_away", "A/A/A/A/A/A"), ("half_even", "E/E/E/E/E/E")]
)
def test_resolved_modes_show_their_final_datapath(rule, cell):
    resolved = [resolve_mode(name, rounding=rule) for name in ("0", "2-3")]
    _, rows = _parse(modes_table(resolved))
    assert list(rows) == ["0", "2-3"]
    assert rows["0"][-1] == cell and rows["2-3"][-1] == cell
    assert rows["0"][4] == "kernel_int8"  # semantics; on CPU its reference runs (a note says so)
    assert rows["2-3"][:-1] == EXPECTED["2-3"]


def test_table_accepts_one_name_or_mode_and_rejects_unknown_names():
    _, rows = _parse(modes_table("2-4"))
    assert list(rows) == ["2-4"]
    _, rows = _parse(modes_table([get_mode("3"), "fp16"]))
    assert list(rows) == ["3", "fp16"]
    with pytest.raises(ModeError, match="'3'"):
        modes_table(["0", "1"])


def test_json_lists_every_mode_and_round_trips():
    entries = json.loads(modes_json())
    assert [entry["name"] for entry in entries] == list(REGISTRY)
    for entry in entries:
        mode = get_mode(entry["name"])
        assert Mode.from_dict(entry) == mode
        if mode.is_quantized:
            datapath = Datapath.from_dict(entry["datapath"])
            assert [
                datapath.conv_input,
                datapath.conv_output,
                entry["x_proj_input"],
                datapath.ssm_input,
                datapath.ssm_impl,
                datapath.gate,
                datapath.linears,
            ] == EXPECTED[entry["name"]]
        else:
            assert entry["datapath"] is None and entry["float_dtype"] == EXPECTED[mode.name][0]


def test_json_of_resolved_modes_is_their_provenance_record():
    resolved = resolve_mode("2-0", rounding="half_away", ssm_impl="reference")
    (entry,) = json.loads(modes_json([resolved]))
    assert entry == json.loads(json.dumps(resolved.to_dict()))
    assert entry["datapath"]["ssm_impl"] == "reference"
    assert entry["declared_datapath"]["ssm_impl"] == "kernel_int8"

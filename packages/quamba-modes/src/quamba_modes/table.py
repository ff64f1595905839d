"""The modes as a table, stage by stage (`quamba-eval modes`), and as JSON (`--json`)."""

from __future__ import annotations

import json
from collections.abc import Iterable

from quamba_layers.datapath import ROUNDING_SITES
from quamba_modes.registry import REGISTRY, Mode, get_mode
from quamba_modes.resolve import STAGES, ResolvedMode, datapath_stages

# Short rule names in the rounding column.
_RULE_ABBREVIATION = {"half_away": "A", "half_even": "E"}

LEGEND = (
    "conv input: int8_static = in_proj INT8 codes (s_xz); int8_dynamic = float in_proj output "
    "quantised per sequence with max|x|/127.\n"
    "conv output: int8 = codes (s_u); fp32_grid = codes * s_u in FP32; fp32 = true FP32 "
    "(no rounding, no clamp).\n"
    "x_proj input: 'int8 codes' = the conv's codes; 'Q8(v, s_u)' = the true FP32 output "
    "re-quantised (requant rule).\n"
    "SSM input u: int8 = conv codes; fp32_grid = FP32 on the INT8 grid; requant_int8 = Q8(v, s_u); "
    "fp32 = true FP32, unclipped.\n"
    "SSM implementation: kernel_int8 = CUDA INT8 scan; reference = PyTorch sequential FP32 scan; "
    "sim_kernel = GPU scan bit-identical to the reference.\n"
    "gate z: int8 = in_proj codes (s_xz); fp32 = float in_proj output.\n"
    f"rounding sites in order {'/'.join(ROUNDING_SITES)}: A = half_away (C roundf), "
    "E = half_even (torch.round).\n"
    "fp16, fp32: the unquantized model in that dtype (the reference for comparisons); no INT8 stage."
)


def _as_mode_and_datapath(item: Mode | ResolvedMode | str):
    if isinstance(item, ResolvedMode):
        return item.mode, item.datapath
    mode = get_mode(item)
    return mode, mode.datapath


def _items(modes: Iterable[Mode | ResolvedMode | str] | None) -> list:
    if modes is None:
        return list(REGISTRY.values())
    if isinstance(modes, str | Mode | ResolvedMode):
        return [modes]
    return list(modes)


def modes_table(modes: Iterable[Mode | ResolvedMode | str] | None = None) -> str:
    """A markdown table (aligned, readable as plain text): one row per mode, one column per stage.

    `modes`: names, `Mode`s or `ResolvedMode`s (the latter show their final datapath); None means
    every registered mode. Each mode's title and intent, then a legend of the values, follow.
    """
    header = ["mode", *(label for label, _ in STAGES), "rounding"]
    rows = []
    modes_shown = []
    for item in _items(modes):
        mode, datapath = _as_mode_and_datapath(item)
        modes_shown.append(mode)
        if datapath is None:
            # The unquantized model: every stage in its float dtype, no rounding site.
            cells = [mode.float_dtype] * (len(header) - 2) + ["-"]
        else:
            rules = datapath.rounding.to_dict()
            rounding = "/".join(_RULE_ABBREVIATION[rules[site]] for site in ROUNDING_SITES)
            cells = [value for _, value in datapath_stages(datapath)] + [rounding]
        rows.append([mode.name, *cells])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cell.ljust(width) for cell, width in zip(cells, widths)) + " |"

    text = [line(header), "|" + "|".join("-" * (width + 2) for width in widths) + "|"]
    text.extend(line(row) for row in rows)
    titles = [f"- {mode.name}: {mode.title}. {mode.description}" for mode in modes_shown]
    return "\n".join(text) + "\n\n" + "\n".join(titles) + "\n\n" + LEGEND + "\n"


def modes_json(modes: Iterable[Mode | ResolvedMode | str] | None = None) -> str:
    """The descriptions as a JSON list (`Mode.to_dict()`, or `ResolvedMode.to_dict()`)."""
    entries = []
    for item in _items(modes):
        entries.append(
            item.to_dict() if isinstance(item, ResolvedMode) else get_mode(item).to_dict()
        )
    return json.dumps(entries, indent=2)

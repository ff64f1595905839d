"""Benchmark results record what produced them (tools/bench/provenance.py), written atomically."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "tools" / "bench"
sys.path.insert(0, str(BENCH))

import provenance  # noqa: E402
import tables  # noqa: E402


def _tree(root: Path) -> Path:
    files = {
        "kernels-cpp/csrc/k.cu": "__global__ void k() {}\n",
        "kernels-cpp/bindings/b.cpp": "int b;\n",
        "packages/quamba-x/src/quamba_x/m.py": "X = 1\n",
        "packages/quamba-x/pyproject.toml": "[project]\nname = 'x'\n",
        "tools/bench/run.py": "print(1)\n",
        "docs/notes.md": "words\n",
    }
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_source_digest_follows_the_benchmarked_sources_only(tmp_path):
    root = _tree(tmp_path)
    first = provenance.source_digest(root)
    assert first == provenance.source_digest(root)  # deterministic
    assert len(first) == 64

    # Neither documentation, tests nor caches change what a benchmark runs.
    (root / "docs" / "notes.md").write_text("other words\n")
    tests = root / "packages" / "quamba-x" / "tests"
    tests.mkdir()
    (tests / "test_m.py").write_text("def test(): pass\n")
    cache = root / "packages" / "quamba-x" / "src" / "quamba_x" / "__pycache__"
    cache.mkdir()
    (cache / "m.cpython-312.pyc").write_bytes(b"\x00\x01")
    assert provenance.source_digest(root) == first

    # Device code, Python and file names do.
    kernel = root / "kernels-cpp" / "csrc" / "k.cu"
    kernel.write_text("__global__ void k() { }\n")
    changed = provenance.source_digest(root)
    assert changed != first
    kernel.rename(root / "kernels-cpp" / "csrc" / "k2.cu")
    assert provenance.source_digest(root) not in (first, changed)


def test_git_state_without_a_repository(tmp_path):
    assert provenance.git_state(_tree(tmp_path)) == (None, None)


def test_write_result_records_provenance_atomically(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["bench.py", "--quick"])
    target = tmp_path / "out" / "result.json"
    provenance.write_result({"device": "test", "rows": [{"us": 1.5}]}, target)
    data = json.loads(target.read_text())
    assert data["rows"] == [{"us": 1.5}] and data["device"] == "test"
    record = data["provenance"]
    assert record["source_digest"] == provenance.source_digest()
    assert record["command"] == "bench.py --quick"
    assert record["created_utc"].endswith("+00:00")
    assert sorted(p.name for p in target.parent.iterdir()) == ["result.json"]  # no temp file


def test_check_a_result_against_this_tree(tmp_path, capsys, monkeypatch):
    ours, theirs, old = tmp_path / "ours.json", tmp_path / "theirs.json", tmp_path / "old.json"
    provenance.write_result({"rows": []}, ours)
    other = json.loads(ours.read_text())
    other["provenance"]["source_digest"] = "0" * 64
    theirs.write_text(json.dumps(other))
    old.write_text(json.dumps({"rows": []}))

    monkeypatch.setattr(sys, "argv", ["provenance.py", str(ours)])
    assert provenance.main() == 0
    assert "produced by these sources" in capsys.readouterr().out
    for path, message in ((theirs, "other sources"), (old, "no provenance recorded")):
        monkeypatch.setattr(sys, "argv", ["provenance.py", str(path)])
        assert provenance.main() == 1
        assert message in capsys.readouterr().out


@pytest.mark.parametrize("with_provenance", [True, False])
def test_tables_name_the_sources(with_provenance):
    data = {"device": "GPU", "copy_GBps": 3000.0, "new_tokens": 128, "rows": []}
    if with_provenance:
        data["provenance"] = {
            "source_digest": "ab" * 32,
            "git_commit": "0123456789abcdef",
            "git_dirty": False,
            "created_utc": "2026-11-21T19:00:00+00:00",
        }
    line = tables.e2e_table(data).splitlines()[1]
    if with_provenance:
        assert line == (
            "Sources: commit 0123456789, digest abababababababab; measured 2026-11-21T19:00:00+00:00."
        )
    else:
        assert line.startswith("Sources: not recorded")


def test_e2e_table_compares_each_decode_step_with_fp16():
    """e2e.py --decode-kernel both: one W8A8 row per decode step, each against the FP16 row of
    its configuration; rows of files from before the decode field show "-"."""

    def row(kind, decode, tpot):
        r = {"model": "2.8b", "batch": 1, "prompt": 1024, "kind": kind, "programmatic_launch": True,
             "ttft_ms": 20.0, "ttft_graph_ms": 16.0, "tpot_ms": tpot, "floor_ms": 1.0,
             "peak_GiB": 4.0}  # fmt: skip
        if decode is not None:
            r["decode"] = decode
        return r

    data = {"device": "GPU", "copy_GBps": 3000.0, "new_tokens": 16,
            "rows": [row("fp16", "per_op", 4.5), row("w8a8", "persistent", 1.5),
                     row("w8a8", "per_op", 1.8), row("w8a8", None, 2.25)]}  # fmt: skip
    table = tables.e2e_table(data)
    assert "| 2.8b | 1 | 1024 | w8a8 | persistent | on | 20.00 | 16.00 | 1.500 |" in table
    lines = table.splitlines()
    ratios = [line for line in lines if line.endswith("x |")]
    assert ratios == [
        "| 2.8b | 1 | 1024 | persistent | on | 1.00x | 1.00x | 3.00x | 1.00x |",
        "| 2.8b | 1 | 1024 | per_op | on | 1.00x | 1.00x | 2.50x | 1.00x |",
        "| 2.8b | 1 | 1024 | - | on | 1.00x | 1.00x | 2.00x | 1.00x |",
    ]


def test_probe_table_rows():
    row = {"model": "2.8b", "mode": "full", "sync": "tagged", "chain": 0, "inflight": 4,
           "us_per_layer": 16.5, "floor_us": 14.0, "wait_fraction": 0.16,
           "boundary_fraction": 0.73}  # fmt: skip
    data = {"kind": "persistent_decode_probe", "device": "GPU", "sms": 132, "read_gbs": 3076.0,
            "copy_gbs": 2973.0, "rows": [row]}  # fmt: skip
    lines = tables.probe_table(data).splitlines()
    assert lines[0] == "Device: GPU (132 SMs), read bandwidth 3076 GB/s, copy 2973 GB/s."
    assert lines[-1] == "| 2.8b | full | tagged | 0 | 4 | 16.50 | 14.00 | 1.18 | 16% | 73% |"


def test_costs_table_rows():
    row = {"model": "2.8b", "batch": 1, "prompt": 1024, "kind": "out_proj", "calls": 64,
           "ms_in_model": 1.63, "us_per_call": 25.5, "prefill_ms": 14.33}  # fmt: skip
    data = {"kind": "model_costs", "device": "GPU", "rows": [row]}
    lines = tables.costs_table(data).splitlines()
    assert lines[0] == "Device: GPU."
    assert lines[-1] == (
        "| 2.8b | 1 | 1024 | prefill | out_proj | 64 | 1.630 | 25.5 | 11% of 14.33 ms |"
    )
    step = {"model": "2.8b", "batch": 1, "prompt": 1024, "phase": "decode", "kind": "hadamard",
            "calls": 64, "ms_in_model": 0.0256, "us_per_call": 0.4, "step_ms": 1.957,
            "floor_ms": 0.98}  # fmt: skip
    lines = tables.costs_table({**data, "rows": [step]}).splitlines()
    assert lines[-1] == (
        "| 2.8b | 1 | 1024 | decode | hadamard | 64 | 0.026 | 0.4 | "
        "1% of 1.957 ms step (floor 0.980) |"
    )


def test_eval_speed_table_rows():
    rows = [{"mode": "0", "seconds": 2.0, "ssm": "INT8 scan"},
            {"mode": "3", "seconds": 2.9, "ssm": "simulation scan"}]  # fmt: skip
    data = {"kind": "eval_speed", "device": "GPU", "documents": 5153, "batch_size": 64,
            "n_layer": 24, "torch": "2.11", "rows": rows}  # fmt: skip
    lines = tables.table_for(data).splitlines()
    assert lines[0] == "Device: GPU; documents 5153, batch 64, layers 24, torch 2.11."
    assert lines[-2:] == [
        "| 0 | 2.00 | 1.00x | INT8 scan |",
        "| 3 | 2.90 | 1.45x | simulation scan |",
    ]
    # eval_speed.py's files from before it recorded its settings: a bare list of rows.
    old = tables.table_for(rows).splitlines()
    assert old[0] == "Device: not recorded." and old[-1] == lines[-1]
    # Since session 21: the median of round-robin passes, each pass listed.
    for row, runs in zip(rows, ([2.1, 2.0, 1.9], [2.9, 3.4, 2.8])):
        row["runs"] = runs
    lines = tables.table_for({**data, "repeats": 3}).splitlines()
    assert "passes per mode (median) 3" in lines[0]
    assert lines[-1] == "| 3 | 2.90 | 1.45x | 2.90 / 3.40 / 2.80 | simulation scan |"


def test_persistent_decode_table_rows():
    row = {"model": "2.8b", "batch": 1, "prompt": 1024, "inflight": 3, "floor_ms": 1.0,
           "per_op_step_ms": 1.9, "persistent_step_ms": 3.8, "same_logits": True,
           "phases_us_per_layer": {"norm": 3.0, "in_proj": 12.25}}  # fmt: skip
    data = {"kind": "persistent_decode", "device": "GPU", "copy_GBps": 2950.0, "torch": "2.11",
            "rows": [row]}  # fmt: skip
    lines = tables.table_for(data).splitlines()
    assert lines[5] == "| 2.8b | 1 | 1024 | 1.900 | 3.800 | 2.00 | 1.000 | 3.80 | yes |"
    assert lines[-3:] == ["| model | norm | in_proj |", "|---|---|---|", "| 2.8b | 3.00 | 12.25 |"]
    # Files without phase_order (sorted keys) come out in the kernel's order.
    row["phases_us_per_layer"] = {"out_proj": 5.0, "in_proj": 12.25, "norm": 3.0}
    lines = tables.table_for(data).splitlines()
    assert lines[-3] == "| model | norm | in_proj | out_proj |"


@pytest.mark.parametrize("data", [{"a": 1}, [], [{"mode": "0"}], [1, 2], "text", 3])
def test_tables_reject_unknown_results(data, tmp_path, capsys, monkeypatch):
    assert tables.table_for(data) is None
    path = tmp_path / "result.json"
    path.write_text(json.dumps(data))
    monkeypatch.setattr(sys, "argv", ["tables.py", str(path)])
    assert tables.main() == 2
    assert "not a result of bench_gemm.py" in capsys.readouterr().err


def test_model_costs_names_the_projections():
    model_costs = pytest.importorskip("model_costs")
    from quamba_layers.config import MambaConfig

    cfg = MambaConfig.from_preset("2.8b")  # d_model 2560, d_inner 5120, dt_rank 160, d_state 16
    shapes = {(10240, 2560): "in_proj", (5120, 2560): "in_proj half", (5120, 160): "dt_proj",
              (2560, 5120): "out_proj", (192, 5120): "x_proj's GEMM"}  # fmt: skip
    for shape, kind in shapes.items():
        assert model_costs.gemm_kind(cfg, torch.empty(shape)) == kind

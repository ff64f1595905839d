"""The quamba-eval command line, end to end on the bundled tiny model (small limits)."""

from __future__ import annotations

import json

import pytest

from quamba_eval.cli import main


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    for name in (
        "FLOAT_SIM_ASIC_INT8",
        "QUAMBA_MODE",
        "CONV1D_MODE24_FP32",
        "SSM_USE_PYTORCH_INT8",
    ):
        monkeypatch.delenv(name, raising=False)


def _run(tmp_path, name, *extra):
    out = tmp_path / name
    code = main(["--mode", "2-4", "--limit", "12", "--fidelity-docs", "4", "--calib-samples", "4",
                 "--output", str(out), *extra])  # fmt: skip
    assert code == 0
    return json.loads((out / "results.json").read_text()), out


def _per_sample(out, mode):
    return [json.loads(line) for line in (out / f"samples_builtin_recall_{mode}.jsonl").open()]


def test_default_run_writes_results_with_statistics_and_provenance(tmp_path, capsys):
    results, out = _run(tmp_path, "a")
    printed = capsys.readouterr().out
    assert "modes against the fp32 reference" in printed
    assert {"builtin_recall@fp32", "builtin_recall@2-4"} <= results["results"].keys()
    quamba = results["quamba"]
    assert quamba["modes"]["2-4"]["datapath"]["conv_output"] == "fp32"
    assert quamba["provenance"]["model"]["model"] == "bundled:tiny-mamba-bytes"
    assert len(quamba["provenance"]["model"]["sha256"]) == 64
    assert quamba["provenance"]["seed"] == 1234
    comparison = quamba["statistics"]["comparisons"]["2-4"]["builtin_recall"]["acc"]
    assert 0.0 <= comparison["p_value"] <= 1.0 and comparison["verdict"]
    assert "2-4" in quamba["fidelity"]
    assert (out / "report.md").read_text().startswith("# quamba-eval report")
    assert len(_per_sample(out, "fp32")) == 12


def test_same_command_same_numbers_and_batch_size_does_not_matter(tmp_path):
    _, out_a = _run(tmp_path, "a", "--batch-size", "5")
    _, out_b = _run(tmp_path, "b", "--batch-size", "1")
    for mode in ("fp32", "2-4"):
        assert _per_sample(out_a, mode) == _per_sample(out_b, mode)


def test_testing_flag_warns_about_power(tmp_path, capsys):
    code = main(["--mode", "0", "--testing", "--limit", "100", "--fidelity-docs", "0",
                 "--calib-samples", "4", "--tasks", "builtin_recall", "--reference", "2-0"])  # fmt: skip
    assert code == 0
    assert "100 documents per task" in capsys.readouterr().out


def test_modes_table_and_json(capsys):
    assert main(["modes"]) == 0
    table = capsys.readouterr().out
    for name in ("0", "2-0", "2-1", "2-2", "2-3", "2-4", "3", "fp16", "fp32"):
        assert name in table
    assert main(["modes", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--mode", "1"], "3"),
        (["--mode", "9-9"], "2-4"),
        (["--mode", "2-4", "--device", "cuda:0"], "cuda"),
        (["--mode", "2-4", "--model", "/nonexistent/model"], "nonexistent"),
    ],
)
def test_bad_input_is_a_clear_error(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("quamba-eval: error:") and message in err


def test_legacy_env_var_contradicting_mode_is_refused(monkeypatch, capsys):
    monkeypatch.setenv("FLOAT_SIM_ASIC_INT8", "true")
    monkeypatch.setenv("CONV1D_MODE24_FP32", "true")
    assert main(["--mode", "0", "--limit", "2"]) == 2
    assert "2-4" in capsys.readouterr().err


def test_compare_and_quantize_commands(tmp_path, capsys):
    code = main(["compare", "--mode", "0,2-4", "--stages", "--windows", "1", "--window-len", "32",
                 "--calib-samples", "4", "--output", str(tmp_path / "cmp"), "--save", str(tmp_path / "t")])  # fmt: skip
    assert code == 0
    data = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert "layer_0.conv_out" in data["modes"]["2-4"]
    assert (tmp_path / "cmp" / "compare_depth.png").is_file()
    saved = sorted(p.name for p in (tmp_path / "t").iterdir())
    assert saved == ["mode_0.safetensors", "mode_2-4.safetensors", "mode_fp32.safetensors"]
    code = main(["compare", "--saved", str(tmp_path / "t" / "mode_0.safetensors"),
                 str(tmp_path / "t" / "mode_2-4.safetensors"), "--output", str(tmp_path / "cmp2")])  # fmt: skip
    assert code == 0
    from quamba_eval.models import bundled_model_dir

    code = main(["quantize", "--model", str(bundled_model_dir()), "--calib-samples", "4",
                 "--output", str(tmp_path / "q")])  # fmt: skip
    assert code == 0
    assert (tmp_path / "q" / "model.safetensors").is_file()
    code = main(
        ["--model", str(tmp_path / "q"), "--mode", "0", "--limit", "4", "--fidelity-docs", "0"]
    )
    assert code == 0


def test_float_reference_mode_records_who_runs_its_ops():
    """The float modes record model.implementations(); with the reference backend (CPU) the
    float model runs the PyTorch ops and says so."""
    import torch

    from quamba_eval import runner
    from quamba_eval.models import ModelBundle
    from quamba_layers.config import MambaConfig
    from quamba_layers.model import MambaLM
    from quamba_layers.quant import select_backend
    from quamba_modes import resolve_mode
    from quamba_modes.registry import get_mode

    model = MambaLM(MambaConfig(d_model=32, n_layer=1, vocab_size=64), seed=0)
    bundle = ModelBundle(tokenizer=None, float_model=model)
    backend = select_backend("cpu")
    resolved = resolve_mode("fp16")
    chosen = runner.model_for(get_mode("fp16"), bundle, torch.device("cpu"), resolved, backend)
    assert chosen.dtype == torch.float16
    record = chosen.implementations()
    assert record["path"] == "reference"
    assert model.implementations()["path"] == "reference"  # the fp32 original is untouched

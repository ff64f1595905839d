"""Layer comparison: bases line up (quantized vs float), metrics stream, saved runs compare."""

from __future__ import annotations

import json

import pytest
import torch

from quamba_eval.compare import (
    CaptureWriter,
    capture_float,
    capture_quantized,
    compare_layers,
    compare_saved,
    write_outputs,
)
from quamba_layers.config import MambaConfig
from quamba_layers.model import MambaLM
from quamba_layers.quant import CalibrationSet, quantize
from quamba_modes import get_mode


@pytest.fixture(scope="module")
def models():
    model = MambaLM(MambaConfig(d_model=64, n_layer=3, vocab_size=257), seed=6).eval()
    calib = CalibrationSet(
        torch.randint(0, 257, (4, 32), generator=torch.Generator().manual_seed(0))
    )
    return model, quantize(model, calib, progress=False)


def windows(n=2, length=24):
    g = torch.Generator().manual_seed(9)
    return [torch.randint(0, 257, (2, length), generator=g) for _ in range(n)]


def run_with(qmodel, name):
    def capture(tokens):
        qmodel.set_datapath(get_mode(name).datapath)
        return capture_quantized(qmodel, tokens, stages=True)

    return capture


def test_quantized_layers_compare_in_the_float_basis(models, tmp_path):
    model, qmodel = models
    result = compare_layers(
        lambda t: capture_float(model, t, stages=True, online_hadamard=True),
        {"0": run_with(qmodel, "0"), "2-4": run_with(qmodel, "2-4")},
        windows(),
        "fp32",
    )
    for mode in ("0", "2-4"):
        stats = result.stats[mode]
        assert {stage for _, stage in stats} == {
            "layer",
            "conv_out",
            "ssm_in",
            "ssm_out",
            "out_proj_in",
        }
        for (layer, stage), st in stats.items():
            metrics = st.result()
            # A wrong basis (missing rotation) gives relative errors near or above 1.
            assert metrics["relative_mse"] < 0.05, (mode, layer, stage, metrics["relative_mse"])
            assert metrics["pearson"] > 0.97
    # True FP32 conv output is closer to the float model than INT8 codes.
    c0 = result.stats["0"][(0, "conv_out")].result()["mse"]
    c24 = result.stats["2-4"][(0, "conv_out")].result()["mse"]
    assert c24 < c0
    paths = write_outputs(result, tmp_path)
    data = json.loads(paths["json"].read_text())
    assert "layer_0.conv_out" in data["modes"]["0"]
    assert paths["plot"].read_bytes()[:4] == b"\x89PNG"
    assert "| 0 | layer 0 conv_out |" in paths["markdown"].read_text()


def test_mode_against_mode_reports_identical_fraction(models):
    _, qmodel = models
    result = compare_layers(
        run_with(qmodel, "0"), {"2-0": run_with(qmodel, "2-0")}, windows(1), "0"
    )
    for st in result.stats["2-0"].values():
        assert st.result()["fraction_identical"] == 1.0


def test_saved_runs_compare_offline(models, tmp_path):
    model, qmodel = models
    writer = CaptureWriter(tmp_path)
    live = compare_layers(
        lambda t: capture_float(model, t, stages=True, online_hadamard=True),
        {"2-1": run_with(qmodel, "2-1")},
        windows(),
        "fp32",
        save=writer,
    )
    files = writer.close({"test": True})
    assert len(files) == 2
    offline = compare_saved(tmp_path / "mode_fp32.safetensors", tmp_path / "mode_2-1.safetensors")
    for key, st in live.stats["2-1"].items():
        got = offline.stats["2-1"][key].result()["mse"]
        assert got == pytest.approx(st.result()["mse"], rel=1e-9)


def test_saved_runs_with_different_tensors_are_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"layer_0.layer": torch.randn(2, 3)}, str(tmp_path / "a.safetensors"))
    save_file({"layer_1.layer": torch.randn(2, 3)}, str(tmp_path / "b.safetensors"))
    with pytest.raises(ValueError, match="different tensors"):
        compare_saved(tmp_path / "a.safetensors", tmp_path / "b.safetensors")

"""Legacy Quamba1 checkpoints: every layout variant reloads bit-identically; bad input is refused."""

from __future__ import annotations

import importlib.util
import json
import pickle
import sys
from pathlib import Path

import pytest
import torch

from quamba_compat import LegacyCheckpointError, convert, load_legacy
from quamba_compat.cli import main as compat_main
from quamba_layers.config import MambaConfig
from quamba_layers.model import MambaLM
from quamba_layers.quant import CalibrationSet, QuantRecipe, load_quantized, quantize

_spec = importlib.util.spec_from_file_location(
    "legacy_writer", Path(__file__).with_name("legacy_writer.py")
)
legacy_writer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(legacy_writer)
write_legacy_checkpoint = legacy_writer.write_legacy_checkpoint

VOCAB = 301  # padded to 304


def _quantized(recipe: QuantRecipe):
    model = MambaLM(MambaConfig(d_model=64, n_layer=2, vocab_size=VOCAB), seed=3).eval()
    ids = torch.randint(0, VOCAB, (3, 24), generator=torch.Generator().manual_seed(0))
    return quantize(model, CalibrationSet(ids), recipe, progress=False)


@pytest.fixture(scope="module")
def qmodel():
    return _quantized(QuantRecipe())


@pytest.fixture(scope="module")
def h2t_model():
    return _quantized(QuantRecipe(quantize_embedding=True, quantize_lm_head=True))


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    ("variant", "expected_rules"),
    [
        ("recommended", ["no backbone.norm_f.output_scale", "no lm_head.bias"]),
        ("lm_head_fp32", ["cast to float16"]),
        ("lm_head_zero_bias", ["all zeros: dropped"]),
    ],
)
def test_recommended_quamba1_variants_reload_bit_identical(
    qmodel, tokens, tmp_path, variant, expected_rules
):
    path = write_legacy_checkpoint(qmodel, tmp_path / "quamba-130m-w8a8", variant)
    loaded = load_legacy(path)
    assert torch.equal(loaded(tokens).logits, qmodel(tokens).logits)
    rules = " | ".join(loaded.provenance["legacy_rules"])
    for text in expected_rules:
        assert text in rules


def test_head_to_toe_variant_reloads_bit_identical(h2t_model, tokens, tmp_path):
    path = write_legacy_checkpoint(h2t_model, tmp_path / "h2t")
    loaded = load_legacy(path)
    assert loaded.cfg.embedding == "int8" and loaded.cfg.lm_head == "int8"
    assert torch.equal(loaded(tokens).logits, h2t_model(tokens).logits)


def test_legacy_model_runs_in_every_mode(qmodel, tokens, tmp_path):
    from quamba_modes import REGISTRY

    loaded = load_legacy(write_legacy_checkpoint(qmodel, tmp_path / "ckpt"))
    for mode in REGISTRY.values():
        if mode.datapath is None:
            continue
        loaded.set_datapath(mode.datapath)
        assert torch.isfinite(loaded(tokens).logits).all(), mode.name


def test_convert_gives_bit_identical_logits_and_names_source(qmodel, tokens, tmp_path):
    src = write_legacy_checkpoint(qmodel, tmp_path / "legacy")
    convert(src, tmp_path / "ours")
    ours = load_quantized(tmp_path / "ours")
    assert torch.equal(ours(tokens).logits, load_legacy(src)(tokens).logits)
    converted = ours.provenance["converted_from"]
    assert converted["source"] == str(src)
    assert len(converted["weights_sha256"]) == 64


def test_cli_convert_and_errors(qmodel, tmp_path, capsys):
    src = write_legacy_checkpoint(qmodel, tmp_path / "legacy")
    assert compat_main(["convert", str(src), str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert compat_main(["inspect", str(src)]) == 0
    assert "rule:" in capsys.readouterr().out
    assert compat_main(["convert", str(tmp_path / "missing"), str(tmp_path / "x")]) == 2
    assert "not found" in capsys.readouterr().err


def test_missing_weight_is_named(qmodel, tmp_path):
    path = write_legacy_checkpoint(qmodel, tmp_path / "ckpt")
    state = torch.load(path / "pytorch_model.bin", weights_only=True)
    del state["backbone.layers.1.mixer.x_proj.weight"]
    torch.save(state, path / "pytorch_model.bin")
    with pytest.raises(LegacyCheckpointError, match=r"backbone\.layers\.1\.mixer\.x_proj\.weight"):
        load_legacy(path)


def test_unexpected_key_is_named(qmodel, tmp_path):
    path = write_legacy_checkpoint(qmodel, tmp_path / "ckpt")
    state = torch.load(path / "pytorch_model.bin", weights_only=True)
    state["backbone.layers.0.mixer.surprise"] = torch.zeros(3)
    torch.save(state, path / "pytorch_model.bin")
    with pytest.raises(LegacyCheckpointError, match=r"unexpected keys.*surprise"):
        load_legacy(path)


def test_nonzero_lm_head_bias_and_bad_scale_refused(qmodel, tmp_path):
    path = write_legacy_checkpoint(qmodel, tmp_path / "ckpt")
    state = torch.load(path / "pytorch_model.bin", weights_only=True)
    state["lm_head.bias"] = torch.ones(304, dtype=torch.float16)
    torch.save(state, path / "pytorch_model.bin")
    with pytest.raises(LegacyCheckpointError, match="non-zero"):
        load_legacy(path)
    state.pop("lm_head.bias")
    state["backbone.layers.0.mixer.had.x_H_scale"] = 0.0
    torch.save(state, path / "pytorch_model.bin")
    with pytest.raises(LegacyCheckpointError, match="x_H_scale"):
        load_legacy(path)


class NotAWeight:
    pass


def test_pickles_with_objects_are_refused(qmodel, tmp_path):
    path = write_legacy_checkpoint(qmodel, tmp_path / "ckpt")
    sys.modules[__name__].NotAWeight = NotAWeight
    state = {"backbone.embedding.weight": torch.zeros(2), "payload": NotAWeight()}
    with open(path / "pytorch_model.bin", "wb") as f:
        pickle.dump(state, f)
    torch.save(state, path / "pytorch_model.bin")
    with pytest.raises(LegacyCheckpointError, match="refused"):
        load_legacy(path)


@pytest.mark.parametrize(
    ("layer", "hybrid", "message"),
    [
        ("W8A8QMamba2", False, "W8A8QMamba2 \\(Mamba-2 W8A8\\) is not supported yet"),
        ("W4A8QMamba", False, "W4A8QMamba \\(Mamba-1 W4A8\\) is not supported yet"),
        ("W4A16QMamba", False, "W4A16QMamba"),
        ("W8A8QMamba", True, "hybrid W4AX"),
    ],
)
def test_other_checkpoint_kinds_fail_naming_the_class(qmodel, tmp_path, layer, hybrid, message):
    path = write_legacy_checkpoint(qmodel, tmp_path / "ckpt", layer=layer, hybrid=hybrid)
    with pytest.raises(LegacyCheckpointError, match=message):
        load_legacy(path)


def test_missing_files_and_offline_hub_id(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_legacy(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(FileNotFoundError, match="huggingface-cli download"):
        load_legacy("ut-enyac/quamba-130m-w8a8")


def test_config_without_required_fields(qmodel, tmp_path):
    path = write_legacy_checkpoint(qmodel, tmp_path / "ckpt")
    config = json.loads((path / "config.json").read_text())
    del config["n_layer"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(LegacyCheckpointError, match="n_layer"):
        load_legacy(path)

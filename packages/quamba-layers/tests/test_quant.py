"""The W8A8 pipeline: observers, quantize(), checkpoints (bit-identical reload), decoding, errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from quamba_layers.config import MambaConfig
from quamba_layers.model import MambaLM
from quamba_layers.quant import (
    CalibrationSet,
    MinMaxObserver,
    PercentileObserver,
    QuantRecipe,
    calibration_set_from_texts,
    load_quantized,
    quantize,
    save_quantized,
)
from quamba_layers.quant.observers import quantile_linear


def small_model(d_model=64, n_layer=2, vocab=300, seed=0) -> MambaLM:
    return MambaLM(
        MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=vocab), seed=seed
    ).eval()


def calib(vocab=300, n=4, length=32, seed=1) -> CalibrationSet:
    g = torch.Generator().manual_seed(seed)
    return CalibrationSet(torch.randint(0, vocab, (n, length), generator=g), {"kind": "random"})


@pytest.fixture(scope="module")
def model_and_quantized():
    model = small_model()
    return model, quantize(model, calib(), "quamba", progress=False)


def rel_err(out, ref) -> float:
    return ((out - ref).norm() / ref.norm()).item()


# -- observers --------------------------------------------------------------------------------
def test_minmax_observer_is_running_max_of_abs():
    obs = MinMaxObserver()
    batches = [torch.randn(3, 17) * s for s in (0.5, 2.0, 1.0)]
    for b in batches:
        obs.update(b)
    expected = max(b.abs().max().item() for b in batches) / 127
    assert obs.scale() == pytest.approx(expected, rel=1e-7)


@pytest.mark.parametrize("alpha", [0.9995, 0.99, 1.0])
def test_percentile_observer_is_ema_of_quantiles(alpha):
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 513, generator=g) * (1 + i) for i in range(5)]
    obs = PercentileObserver(alpha=alpha, momentum=0.01)
    for b in batches:
        obs.update(b)
    running = None
    for b in batches:
        c = torch.quantile(b.abs().double().flatten(), alpha).item()
        running = c if running is None else running + 0.01 * (c - running)
    assert obs.scale() == pytest.approx(running / 127, rel=1e-6)


def test_quantile_matches_torch_quantile():
    x = torch.randn(1000, dtype=torch.float64)
    for q in (0.0, 0.5, 0.9995, 1.0):
        assert quantile_linear(x, q) == pytest.approx(torch.quantile(x, q).item(), rel=1e-12)


def test_observer_without_data_raises():
    with pytest.raises(RuntimeError, match="no data"):
        MinMaxObserver().scale()
    with pytest.raises(ValueError, match="alpha"):
        PercentileObserver(alpha=1.5)


# -- quantize ---------------------------------------------------------------------------------
def test_quantized_model_tracks_float_model(model_and_quantized):
    model, qmodel = model_and_quantized
    x = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(5))
    ref = model(x).logits.float()
    out = qmodel(x).logits
    assert out.shape == ref.shape
    assert rel_err(out, ref) < 0.1


def test_quantize_is_deterministic():
    model = small_model()
    a = quantize(model, calib(), progress=False).state_dict()
    b = quantize(model, calib(), progress=False).state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_provenance_records_recipe_and_calibration(model_and_quantized):
    _, qmodel = model_and_quantized
    prov = qmodel.provenance
    assert prov["recipe"]["percentile_alpha"] == 0.9995
    assert prov["recipe"]["hadamard"] is True
    assert len(prov["calibration"]["token_sha256"]) == 64
    assert prov["calibration"]["num_samples"] == 4
    assert "torch" in prov["versions"]


def test_results_do_not_depend_on_batch(model_and_quantized):
    _, qmodel = model_and_quantized
    g = torch.Generator().manual_seed(7)
    x = torch.randint(0, 300, (5, 19), generator=g)
    together = qmodel(x).logits
    for i in range(5):
        assert torch.equal(qmodel(x[i : i + 1]).logits[0], together[i])


def test_naive_recipe_has_no_hadamard():
    model = small_model()
    qmodel = quantize(model, calib(), "naive", progress=False)
    assert qmodel.cfg.online_hadamard is False
    x = torch.randint(0, 300, (1, 16))
    assert rel_err(qmodel(x).logits, model(x).logits.float()) < 0.2


def test_unsupported_hadamard_size_is_a_clear_error():
    model = small_model(d_model=100)
    with pytest.raises(ValueError, match=r"2\^k, 12\*2\^k and 40\*2\^k"):
        quantize(model, calib(), "quamba", progress=False)
    # Without the Hadamard rotation any size works.
    quantize(model, calib(), QuantRecipe(hadamard=False), progress=False)


def test_calibration_data_shorter_than_asked():
    class Bytes:
        eos_token_id = 0

        def encode(self, text):
            return list(text.encode())

    with pytest.raises(ValueError, match="too short"):
        calibration_set_from_texts(["abc", "def"], Bytes(), num_samples=4, seq_len=8)
    cal = calibration_set_from_texts(["abcdefgh" * 4], Bytes(), num_samples=2, seq_len=8)
    assert cal.token_ids.shape == (2, 8)
    assert cal.token_ids[0].tolist() == list(b"abcdefgh")


def test_130m_shaped_model_runs_mode0_on_cpu():
    """The real 130m shape (24 layers, d_model 768, vocab 50280): ~10 s on 2 CPU cores."""
    cfg = MambaConfig(d_model=768, n_layer=24, vocab_size=50277)
    model = MambaLM(cfg, seed=0).eval()
    qmodel = quantize(model, calib(50277, n=2, length=16), progress=False)
    x = torch.randint(0, 50277, (1, 9))
    out = qmodel(x).logits
    assert out.shape == (1, 9, 50280)
    assert torch.isfinite(out).all()
    assert rel_err(out, model(x).logits.float()) < 0.15


# -- checkpoints ------------------------------------------------------------------------------
def test_reload_is_bit_identical(model_and_quantized, tmp_path):
    _, qmodel = model_and_quantized
    save_quantized(qmodel, tmp_path / "ckpt")
    reloaded = load_quantized(tmp_path / "ckpt")
    x = torch.randint(0, 300, (3, 21), generator=torch.Generator().manual_seed(9))
    assert torch.equal(reloaded(x).logits, qmodel(x).logits)
    assert reloaded.provenance == json.loads(json.dumps(qmodel.provenance))
    assert not list((tmp_path / "ckpt").glob("*.tmp")), "atomic writes leave no temp files"


@pytest.mark.parametrize("bad", [0.0, -0.01, math.nan, math.inf])
def test_bad_scale_in_checkpoint_is_refused(model_and_quantized, tmp_path, bad):
    _, qmodel = model_and_quantized
    path = save_quantized(qmodel, tmp_path / "ckpt")
    tensors = load_file(str(path / "model.safetensors"))
    tensors["backbone.layers.1.mixer.s_u"] = torch.tensor(bad, dtype=torch.float32)
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match="s_u"):
        load_quantized(path)


def test_config_and_tensors_disagree(model_and_quantized, tmp_path):
    _, qmodel = model_and_quantized
    path = save_quantized(qmodel, tmp_path / "ckpt")
    meta = json.loads((path / "config.json").read_text())
    meta["config"]["d_state"] = 8
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"A_log: expected \(128, 8\)"):
        load_quantized(path)


def test_missing_tensor_and_missing_files(model_and_quantized, tmp_path):
    _, qmodel = model_and_quantized
    path = save_quantized(qmodel, tmp_path / "ckpt")
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["backbone.layers.0.mixer.D"]
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing tensors: backbone\.layers\.0\.mixer\.D"):
        load_quantized(path)
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_quantized(tmp_path / "nowhere")


def test_nan_scale_in_memory_is_refused(model_and_quantized):
    _, qmodel = model_and_quantized
    fresh = type(qmodel)(qmodel.cfg)
    with pytest.raises(ValueError, match="invalid quantization scales"):
        fresh(torch.randint(0, 300, (1, 4)))


# -- decoding ---------------------------------------------------------------------------------
def test_decode_stays_close_to_prefill(model_and_quantized):
    """Decode requantizes the SSM state to INT8 every step; prefill keeps it in float32.

    The logits therefore drift a little; the bound here is the documented behaviour.
    """
    _, qmodel = model_and_quantized
    x = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(3))
    full = qmodel(x).logits
    logits, state = qmodel.prefill(x[:, :4])
    assert torch.equal(logits, qmodel(x[:, :4]).logits)
    worst = 0.0
    for t in range(4, 16):
        step_logits, state = qmodel.step(x[:, t], state)
        worst = max(worst, rel_err(step_logits, full[:, t]))
    assert worst < 0.05


def test_generate_is_deterministic(model_and_quantized):
    _, qmodel = model_and_quantized
    prompt = torch.randint(0, 300, (2, 5), generator=torch.Generator().manual_seed(4))
    greedy = qmodel.generate(prompt, 6)
    assert greedy.shape == (2, 11)
    assert torch.equal(greedy, qmodel.generate(prompt, 6))
    sampled = qmodel.generate(prompt, 6, temperature=1.0, top_k=20, seed=11)
    assert torch.equal(sampled, qmodel.generate(prompt, 6, temperature=1.0, top_k=20, seed=11))


def test_head_to_toe_variant_reloads_bit_identical(tmp_path):
    model = small_model()
    recipe = QuantRecipe(quantize_embedding=True, quantize_lm_head=True)
    qmodel = quantize(model, calib(), recipe, progress=False)
    assert qmodel.cfg.embedding == "int8" and qmodel.cfg.lm_head == "int8"
    assert qmodel.lm_head_weight.dtype == torch.int8
    x = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(2))
    out = qmodel(x).logits
    assert rel_err(out, model(x).logits.float()) < 0.15
    save_quantized(qmodel, tmp_path / "h2t")
    assert torch.equal(load_quantized(tmp_path / "h2t")(x).logits, out)


def test_step_updates_the_state_in_place_and_returns_it(model_and_quantized):
    """Decode-step ops update the state they are given (what a CUDA graph needs), on the
    reference backend too; the returned state is the same tensors, now one token further."""
    _, qmodel = model_and_quantized
    x = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(8))
    _, state = qmodel.prefill(x[:, :8])
    before = [(c.clone(), s.clone()) for c, s in state]
    _, new_state = qmodel.step(x[:, 8], state)
    for (conv, ssm), (new_conv, new_ssm), (conv0, ssm0) in zip(state, new_state, before):
        assert new_conv is conv and new_ssm is ssm
        assert not torch.equal(conv, conv0)  # the newest code entered the conv window
        assert torch.equal(conv[..., :-1], conv0[..., 1:])
        assert not torch.equal(ssm, ssm0)


def test_last_only_prefill_is_the_last_position_of_the_full_one(model_and_quantized):
    """Everything before the head is the same computation; the float32 lm_head matmul of one
    row instead of L may sum in another order (BLAS blocking), so the logits agree to float32
    rounding and pick the same tokens."""
    _, qmodel = model_and_quantized
    x = torch.randint(0, 300, (3, 11), generator=torch.Generator().manual_seed(9))
    full = qmodel(x).logits[:, -1:]
    for last in (qmodel(x, last_only=True).logits, qmodel.prefill(x, last_only=True)[0]):
        assert last.shape == full.shape
        torch.testing.assert_close(last, full, rtol=1e-5, atol=1e-6)
        assert torch.equal(last.argmax(-1), full.argmax(-1))


def test_graph_decoding_needs_a_cuda_model_and_says_why(model_and_quantized):
    _, qmodel = model_and_quantized
    supported, reason = qmodel.graph_decoding_supported()
    assert not supported and "CUDA" in reason
    prompt = torch.randint(0, 300, (1, 4), generator=torch.Generator().manual_seed(10))
    with pytest.raises(ValueError, match=r"cannot be captured: .*CUDA"):
        qmodel.generate(prompt, 2, cuda_graph=True)
    assert torch.equal(qmodel.generate(prompt, 3, cuda_graph=False), qmodel.generate(prompt, 3))


def test_persistent_decode_is_the_default_and_says_why_not(model_and_quantized):
    _, qmodel = model_and_quantized
    assert qmodel.decode_kernel == "auto"  # the default: the persistent kernel where it can run
    assert qmodel.decode_implementation(1) == "per_op"  # ... which is not on a CPU
    supported, reason = qmodel.persistent_decode_supported(1)
    assert not supported and "CUDA" in reason  # a CPU model
    with pytest.raises(TypeError):  # the class-wide default cannot be changed by accident
        qmodel.decode_kernel_options["timing"] = True
    qmodel.decode_kernel = "fast"
    try:
        with pytest.raises(ValueError, match='decode_kernel must be "auto" or "per_op"'):
            qmodel.decode_implementation(1)
        qmodel.decode_kernel = "per_op"
        assert qmodel.decode_implementation(1) == "per_op"
        prompt = torch.randint(0, 300, (1, 5), generator=torch.Generator().manual_seed(11))
        per_op = qmodel.generate(prompt, 3)
    finally:
        qmodel.decode_kernel = "auto"
    assert torch.equal(per_op, qmodel.generate(prompt, 3))


def test_persistent_decode_refuses_inference_tensor_weights(model_and_quantized):
    """The persistent kernel copies x_proj's weight and follows in-place writes by the version
    counter; a model whose weight has none (made under inference_mode) keeps the per-op step."""
    _, qmodel = model_and_quantized
    mixer = qmodel.mixers[0]
    weight = mixer.x_proj_weight
    with torch.inference_mode():
        frozen = weight.clone()
    mixer.x_proj_weight = frozen
    try:
        supported, reason = qmodel.persistent_decode_supported(1)
        assert not supported and "inference tensor" in reason
        assert qmodel.decode_implementation(1) == "per_op"
    finally:
        mixer.x_proj_weight = weight


def test_reference_backend_seq_last_layout_is_the_transpose(model_and_quantized):
    from quamba_layers.quant.backends import reference_backend

    backend = reference_backend()
    g = torch.Generator().manual_seed(12)
    x = torch.randint(-128, 128, (2, 5, 48), generator=g, dtype=torch.int8)
    w = torch.randint(-128, 128, (24, 48), generator=g, dtype=torch.int8)
    row = backend.w8a8_linear(x, w, 0.02, 0.01, 0.3, "half_away")
    seq_last = backend.w8a8_linear(x, w, 0.02, 0.01, 0.3, "half_away", layout="seq_last")
    assert seq_last.shape == (2, 24, 5) and seq_last.is_contiguous()
    assert torch.equal(seq_last, row.transpose(1, 2))


@pytest.mark.parametrize(
    ("conv_output", "ssm_input"),
    [("int8", "int8"), ("fp32_grid", "fp32_grid"), ("fp32", "requant_int8"), ("fp32", "fp32")],
)
def test_sim_kernel_scan_on_int8_codes_gives_the_reference_bits(
    model_and_quantized, conv_output, ssm_input
):
    """ssm_impl "sim_kernel" with INT8 gate codes goes through the backend's
    selective_scan_int8_exact (the exact INT8 scan kernel on CUDA): on the reference backend it
    must give the reference scan's logits and prefill state, bit for bit."""
    from quamba_layers.datapath import Datapath

    _, qmodel = model_and_quantized
    tokens = torch.randint(0, 300, (2, 21), generator=torch.Generator().manual_seed(9))
    results, original = {}, qmodel.datapath
    try:
        for impl in ("sim_kernel", "reference"):
            dp = Datapath(conv_output=conv_output, ssm_input=ssm_input, ssm_impl=impl)
            qmodel.set_datapath(dp)
            logits = qmodel(tokens).logits
            _, state = qmodel.prefill(tokens)
            results[impl] = (logits, state)
    finally:
        qmodel.set_datapath(original)
    (a, state_a), (b, state_b) = results["sim_kernel"], results["reference"]
    assert torch.equal(a, b)
    for layer_a, layer_b in zip(state_a, state_b):
        assert all(torch.equal(x, y) for x, y in zip(layer_a, layer_b))

"""Stage-by-stage proof of every mode on quantized models (modes.md, "Expected relations")."""

from __future__ import annotations

import pytest
import torch

from quamba_layers import reference_ops as ops
from quamba_layers.config import MambaConfig
from quamba_layers.model import MambaLM
from quamba_layers.quant import CalibrationSet, quantize, select_backend
from quamba_modes import REGISTRY, get_mode, resolve_mode
from quamba_modes.probes import StageProbe, on_int8_grid

QUANTIZED = [name for name, mode in REGISTRY.items() if mode.datapath is not None]


def _random_setup():
    """A random model whose conv outputs exceed 127*s_u (percentile scales clip outliers)."""
    model = MambaLM(MambaConfig(d_model=64, n_layer=3, vocab_size=257), seed=4).eval()
    g = torch.Generator().manual_seed(2)
    calib = CalibrationSet(torch.randint(0, 257, (4, 48), generator=g))
    tokens = torch.randint(0, 257, (3, 40), generator=torch.Generator().manual_seed(3))
    return model, quantize(model, calib, progress=False), tokens


def _bundled_setup():
    """The bundled tiny model on real text: real activations, real outliers."""
    from quamba_eval import builtin_task
    from quamba_eval.models import bundled_model_dir
    from quamba_layers import ByteTokenizer, load_model
    from quamba_layers.quant import calibration_set_from_texts

    model = load_model(bundled_model_dir())
    tok = ByteTokenizer()
    calib = calibration_set_from_texts(builtin_task.training_documents(16, seed=0), tok, 4, 128)
    docs = [d["text"] for d in builtin_task.generate_documents(3)]
    length = min(len(tok.encode(d)) for d in docs)
    tokens = torch.tensor([tok.encode(d)[:length] for d in docs])
    return model, quantize(model, calib, progress=False), tokens


@pytest.fixture(scope="module", params=["random", "bundled"])
def setup(request):
    torch.manual_seed(0)
    return _random_setup() if request.param == "random" else _bundled_setup()


def run(qmodel, mode_name, tokens, rounding=None, layers=None):
    resolved = resolve_mode(mode_name, rounding=rounding)
    qmodel.set_datapath(resolved.datapath)
    with StageProbe(qmodel, layers=layers) as probe:
        logits = qmodel(tokens).logits
    return logits, probe.records


@pytest.mark.parametrize("name", QUANTIZED)
def test_every_stage_matches_the_mode_table(setup, name):
    _, qmodel, tokens = setup
    dp = get_mode(name).datapath
    _, records = run(qmodel, name, tokens)
    for layer, rec in records.items():
        s = qmodel.mixers[layer].scales()
        assert rec["norm_out"].dtype == torch.int8
        assert rec["conv_in"].dtype == torch.int8
        assert rec["x_proj_in"].dtype == torch.int8
        assert rec["out_proj_in"].dtype == torch.int8
        assert rec["ssm_out"].dtype == torch.float16
        conv_out, ssm_in = rec["conv_out"], rec["ssm_in"]
        if dp.conv_output == "int8":
            assert conv_out.dtype == torch.int8
        elif dp.conv_output == "fp32_grid":
            assert conv_out.dtype == torch.float32 and on_int8_grid(conv_out, s["s_u"])
        else:  # true float32: not on the grid
            assert conv_out.dtype == torch.float32 and not on_int8_grid(conv_out, s["s_u"])
        if dp.ssm_input in ("int8", "requant_int8"):
            assert ssm_in.dtype == torch.int8
        elif dp.ssm_input == "fp32_grid":
            assert ssm_in.dtype == torch.float32 and on_int8_grid(ssm_in, s["s_u"])
        else:
            assert ssm_in.dtype == torch.float32 and not on_int8_grid(ssm_in, s["s_u"])
        expected_impl = {"kernel_int8": "ssm_int8", "reference": "ssm_reference"}[dp.ssm_impl]
        assert rec["ssm_impl"].startswith(expected_impl), rec["ssm_impl"]


@pytest.mark.parametrize("name", ["2-4", "3"])
def test_true_fp32_modes_keep_values_beyond_the_int8_range(setup, name):
    """Where the FP conv output exceeds 127*s_u, a true-FP32 mode keeps those values unclipped."""
    _, qmodel, tokens = setup
    _, records = run(qmodel, name, tokens)
    beyond = 0
    for layer, rec in records.items():
        limit = 127 * qmodel.mixers[layer].scales()["s_u"]
        beyond += int((rec["ssm_in"].abs() > limit).sum())
        assert torch.equal(rec["ssm_in"], rec["conv_out"])  # unclipped, unrounded
    assert beyond > 0, "the percentile scale should clip some outliers in this model"
    # The INT8 modes can never exceed the range.
    _, records0 = run(qmodel, "2-2", tokens)
    for layer, rec in records0.items():
        limit = 128 * qmodel.mixers[layer].scales()["s_u"]
        assert float(rec["ssm_in"].abs().max()) <= limit


def test_mode_0_and_2_0_are_bit_identical(setup):
    _, qmodel, tokens = setup
    assert torch.equal(run(qmodel, "0", tokens)[0], run(qmodel, "2-0", tokens)[0])


def test_mode_2_2_and_2_1_are_bit_identical(setup):
    _, qmodel, tokens = setup
    assert torch.equal(run(qmodel, "2-2", tokens)[0], run(qmodel, "2-1", tokens)[0])


def test_2_1_vs_0_ssm_outputs_within_tolerance(setup):
    """Same INT8 inputs and algebra; only the scan implementation differs (none on CPU)."""
    _, qmodel, tokens = setup
    _, r0 = run(qmodel, "0", tokens, layers=[0])
    _, r21 = run(qmodel, "2-1", tokens, layers=[0])
    y0, y21 = r0[0]["ssm_out"].float(), r21[0]["ssm_out"].float()
    differing = (y0 != y21).float().mean().item()
    assert ((y0 - y21).norm() / y0.norm()).item() <= 1e-3
    assert differing <= 0.01  # reported per layer by `quamba-eval compare --stages`


def test_2_3_vs_2_1_u_codes_differ_only_at_ties(setup):
    """Layer 0 sees identical conv inputs; Q8_rne(true FP32) vs the conv's Q8_haz codes differ
    exactly where v / s_u is a .5 tie."""
    _, qmodel, tokens = setup
    _, r21 = run(qmodel, "2-1", tokens, layers=[0])
    _, r23 = run(qmodel, "2-3", tokens, layers=[0])
    s_u = qmodel.mixers[0].scales()["s_u"]
    v = r23[0]["conv_out"]
    quotient = v / torch.tensor(s_u, dtype=torch.float32)
    ties = (quotient - torch.trunc(quotient)).abs() == 0.5
    differ = r21[0]["ssm_in"] != r23[0]["ssm_in"]
    assert torch.equal(differ & ~ties, torch.zeros_like(differ))
    fraction = differ.float().mean().item()
    assert fraction <= ties.float().mean().item()


def test_rounding_override_changes_exactly_the_tie_cases(setup):
    _, qmodel, tokens = setup
    _, default = run(qmodel, "0", tokens, layers=[0])
    _, even = run(qmodel, "0", tokens, rounding="half_even", layers=[0])
    mixer = qmodel.mixers[0]
    # Same conv input in layer 0 (the norm and GEMM already round half-even by default).
    assert torch.equal(default[0]["conv_in"], even[0]["conv_in"])
    s = mixer.scales()
    v = ops.conv1d_int8(
        default[0]["conv_in"], s["s_xz"], mixer.conv_weight, s["s_w_conv"], mixer.conv_bias,
        s["s_b_conv"], None,
    )  # fmt: skip
    quotient = v / torch.tensor(s["s_u"], dtype=torch.float32)
    ties = (quotient - torch.trunc(quotient)).abs() == 0.5
    differ = default[0]["conv_out"] != even[0]["conv_out"]
    assert torch.equal(differ, ties & (torch.trunc(quotient) % 2 == 0) & (quotient != 0))


def test_rounding_override_on_constructed_ties():
    """Directly: values exactly on .5 ties round differently, all others identically."""
    s_u = 0.25
    v = torch.tensor([0.125, -0.125, 0.375, 0.3, -0.625, 7.875], dtype=torch.float32)
    away = ops.quantize_int8(v, s_u, "half_away")
    even = ops.quantize_int8(v, s_u, "half_even")
    assert away.tolist() == [1, -1, 2, 1, -3, 32]
    assert even.tolist() == [0, 0, 2, 1, -2, 32]


def test_kernel_backend_without_kernels_fails():
    with pytest.raises(RuntimeError, match="kernel"):
        select_backend("cpu", prefer="kernel")
    with pytest.raises(ValueError, match="kernel implementation requested"):
        resolve_mode("2-4", ssm_impl="kernel", device="cpu", kernels_available=False)


def test_mode3_scale_is_per_sequence_and_ignores_padding(setup):
    """Mode 3's dynamic scale is per sequence: a row's result does not depend on its batch."""
    _, qmodel, tokens = setup
    qmodel.set_datapath(get_mode("3").datapath)
    together = qmodel(tokens).logits
    for i in range(tokens.shape[0]):
        assert torch.equal(qmodel(tokens[i : i + 1]).logits[0], together[i])
    # Right padding with seq_lens leaves the real positions unchanged.
    padded = torch.cat([tokens[:1, :30], torch.zeros(1, 10, dtype=torch.long)], dim=1)
    out = qmodel(padded, seq_lens=torch.tensor([30])).logits
    assert torch.equal(out[0, :30], qmodel(tokens[:1, :30]).logits[0])

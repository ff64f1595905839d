"""FP Mamba-1 model: config, fp_ops references, mixer/model algebra, decode, generation.

Every numerical check compares against an independent float64 computation written here with
torch built-ins (F.conv1d, F.softplus, F.silu, plain sums), not against the code under test.
Parity with transformers' MambaForCausalLM is in test_loading.py.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from quamba_layers.config import PRESETS, MambaConfig
from quamba_layers.fp_ops import (
    causal_conv1d_ref,
    causal_conv1d_update_ref,
    pairwise_sum_last,
    selective_scan_ref,
    selective_state_update_ref,
    softplus_ref,
)
from quamba_layers.model import LMOutput, MambaLM

SMALL = MambaConfig(d_model=48, n_layer=2, vocab_size=101, d_state=12)

# Config variants covering every option (N not a power of two exercises the padded pairwise sum).
VARIANTS = {
    "default": SMALL,
    "untied_bias": dataclasses.replace(
        SMALL, tie_embeddings=False, bias=True, conv_bias=False, d_state=16
    ),
    "k3_rank5_fp16res": dataclasses.replace(
        SMALL, d_conv=3, dt_rank=5, residual_in_fp32=False, n_layer=3, rms_norm_eps=1e-3
    ),
}


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| relative to max |expected| (both in float64)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).abs().max() / expected.abs().max())


def make_model(config: MambaConfig, seed: int = 0, head_scale: float = 25.0) -> MambaLM:
    """A random model with every parameter away from its trivial init (norm weights, D, biases).

    The embedding (and an untied head, by `head_scale`) is scaled up from its 0.02 init so the
    logits are spread out and far from ties.
    """
    model = MambaLM(config, seed=seed).eval()
    generator = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if (
                name.endswith("norm.weight")
                or name.endswith("norm_f.weight")
                or name.endswith(".D")
            ):
                param.copy_(1 + 0.3 * torch.randn(param.shape, generator=generator))
            elif name.endswith("in_proj.bias") or name.endswith("out_proj.bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
        model.backbone.embedding.weight.mul_(25.0)
        if not config.tie_embeddings:
            model.lm_head.weight.mul_(head_scale)
    return model


# --- float64 references -----------------------------------------------------------------------


def conv_f64(x, weight, bias, conv_state=None, silu=True):
    x = x.double()
    batch, channels, _ = x.shape
    kernel = weight.shape[-1]
    if conv_state is None:
        conv_state = torch.zeros(batch, channels, kernel - 1, dtype=torch.float64)
    padded = torch.cat([conv_state.double(), x], dim=-1)
    bias64 = bias.double() if bias is not None else None
    out = F.conv1d(padded, weight.double()[:, None, :], bias64, groups=channels)
    return F.silu(out) if silu else out


def scan_f64(u, delta, A, B, C, D=None, z=None, delta_bias=None, softplus=True, h0=None):
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    if softplus:
        delta = F.softplus(delta)
    batch, channels, length = u.shape
    h = torch.zeros(batch, channels, A.shape[1], dtype=torch.float64) if h0 is None else h0.double()
    ys = []
    for t in range(length):
        dA = torch.exp(delta[:, :, t, None] * A)
        h = dA * h + delta[:, :, t, None] * B[:, None, :, t] * u[:, :, t, None]
        ys.append((h * C[:, None, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + u * D.double()[:, None]
    if z is not None:
        y = y * F.silu(z.double())
    return y.transpose(1, 2), h


def rmsnorm_f64(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.double()


def mixer_f64(mixer, hidden, state=None):
    """The Mamba-1 mixer in float64 from the parameters alone."""
    p = {name: value.detach().double() for name, value in mixer.named_parameters()}
    E, N, R = mixer.d_inner, mixer.d_state, mixer.dt_rank
    xz = F.linear(hidden.double(), p["in_proj.weight"], p.get("in_proj.bias"))
    x, z = xz[..., :E].transpose(1, 2), xz[..., E:].transpose(1, 2)
    conv_state, h0 = state if state is not None else (None, None)
    u = conv_f64(x, p["conv1d.weight"][:, 0], p.get("conv1d.bias"), conv_state)
    x_dbl = F.linear(u.transpose(1, 2), p["x_proj.weight"])
    dt, B, C = x_dbl[..., :R], x_dbl[..., R : R + N], x_dbl[..., R + N :]
    delta = F.linear(dt, p["dt_proj.weight"]).transpose(1, 2)
    y, _ = scan_f64(
        u,
        delta,
        -torch.exp(p["A_log"]),
        B.transpose(1, 2),
        C.transpose(1, 2),
        p["D"],
        z,
        p["dt_proj.bias"],
        h0=h0,
    )
    return F.linear(y, p["out_proj.weight"], p.get("out_proj.bias"))


def lm_f64(model, input_ids):
    """Logits of the whole LM in float64 (residual stream, norms, tied or untied head)."""
    config = model.config
    hidden = model.backbone.embedding.weight.double()[input_ids]
    residual = torch.zeros_like(hidden)
    for layer in model.backbone.layers:
        residual = residual + hidden
        normed = rmsnorm_f64(residual, layer.norm.weight, config.rms_norm_eps)
        hidden = mixer_f64(layer.mixer, normed)
    residual = residual + hidden
    out = rmsnorm_f64(residual, model.backbone.norm_f.weight, config.rms_norm_eps)
    return out @ model.lm_head.weight.double().T


# --- config -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "d_model", "n_layer", "nominal"),
    [
        ("130m", 768, 24, 130e6),
        ("370m", 1024, 48, 370e6),
        ("790m", 1536, 48, 790e6),
        ("1.4b", 2048, 48, 1.4e9),
        ("2.8b", 2560, 64, 2.8e9),
    ],
)
def test_presets_have_published_sizes(name, d_model, n_layer, nominal):
    config = PRESETS[name]
    assert (config.d_model, config.n_layer, config.vocab_size) == (d_model, n_layer, 50277)
    assert config.padded_vocab_size == 50280
    assert config.d_inner == 2 * d_model
    assert config.resolved_dt_rank == math.ceil(d_model / 16)
    assert (config.d_state, config.d_conv, config.tie_embeddings) == (16, 4, True)

    model = MambaLM(config, device="meta")  # shapes only, nothing allocated
    assert model.backbone.embedding.weight.is_meta
    E, D, R, N, K = d_model * 2, d_model, config.resolved_dt_rank, 16, 4
    per_layer = 2 * E * D + E * K + E + (R + 2 * N) * E + R * E + E + E * N + E + D * E + D
    expected = n_layer * per_layer + 50280 * D + D  # tied head counted once
    counted = sum(p.numel() for p in model.parameters())
    assert counted == expected
    assert 0.9 * nominal < counted < 1.1 * nominal


def test_config_dict_round_trip_and_overrides():
    config = dataclasses.replace(SMALL, dt_rank=7, bias=True, rms_norm_eps=1e-6)
    assert MambaConfig.from_dict(config.to_dict()) == config
    assert MambaConfig.from_preset("130m", n_layer=2).n_layer == 2
    assert PRESETS["130m"].n_layer == 24  # presets are not mutated
    assert MambaConfig(d_model=100, n_layer=1, vocab_size=10).resolved_dt_rank == 7
    assert MambaConfig(d_model=8, n_layer=1, vocab_size=17).padded_vocab_size == 24


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"d_model": 0}, "d_model"),
        ({"n_layer": -1}, "n_layer"),
        ({"vocab_size": 2.5}, "vocab_size"),
        ({"dt_rank": "big"}, "dt_rank"),
        ({"dt_rank": 0}, "dt_rank"),
        ({"rms_norm_eps": 0.0}, "rms_norm_eps"),
        ({"rms_norm_eps": float("nan")}, "rms_norm_eps"),
        ({"tie_embeddings": 1}, "tie_embeddings"),
        ({"expand": True}, "expand"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(SMALL, **kwargs)


def test_config_from_dict_and_preset_errors():
    with pytest.raises(ValueError, match="unknown MambaConfig keys"):
        MambaConfig.from_dict({**SMALL.to_dict(), "hidden_size": 3})
    with pytest.raises(ValueError, match="missing required keys"):
        MambaConfig.from_dict({"d_model": 8})
    with pytest.raises(ValueError, match="unknown preset"):
        MambaConfig.from_preset("7b")


# --- fp_ops -----------------------------------------------------------------------------------

TOLERANCE = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


@pytest.mark.parametrize("n", [1, 2, 3, 12, 16, 17])
def test_pairwise_sum_matches_float64_sum(n):
    values = torch.randn(5, n, generator=torch.Generator().manual_seed(n))
    expected = values.double().sum(-1)
    torch.testing.assert_close(pairwise_sum_last(values).double(), expected, rtol=1e-6, atol=1e-6)


def test_softplus_threshold_matches_torch():
    v = torch.tensor([-30.0, -3.0, 0.0, 1.5, 19.5, 20.0, 20.5, 50.0], dtype=torch.float64)
    torch.testing.assert_close(softplus_ref(v), F.softplus(v))
    assert softplus_ref(torch.tensor([25.0])).item() == 25.0  # passes through above 20


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kernel", [2, 4])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("with_state", [True, False])
def test_causal_conv1d_matches_float64(dtype, kernel, with_bias, with_state):
    gen = torch.Generator().manual_seed(kernel * 10 + with_bias * 2 + with_state)
    x = torch.randn(2, 24, 7, generator=gen).to(dtype)
    weight = (0.5 * torch.randn(24, kernel, generator=gen)).to(dtype)
    bias = torch.randn(24, generator=gen).to(dtype) if with_bias else None
    state = torch.randn(2, 24, kernel - 1, generator=gen).to(dtype) if with_state else None
    out, final = causal_conv1d_ref(x, weight, bias, conv_state=state, return_final_state=True)
    expected = conv_f64(x, weight, bias, state)
    assert out.dtype == dtype
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)
    full_input = torch.cat([state if state is not None else torch.zeros_like(x[..., :0]), x], -1)
    torch.testing.assert_close(final, full_input[..., -(kernel - 1) :], rtol=0, atol=0)
    no_act = causal_conv1d_ref(x, weight, bias, activation=None, conv_state=state)
    torch.testing.assert_close(
        no_act.double(), conv_f64(x, weight, bias, state, silu=False), rtol=tol, atol=tol
    )


def test_causal_conv1d_update_equals_prefill_exactly():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 16, 6, generator=gen)
    weight, bias = torch.randn(16, 4, generator=gen), torch.randn(16, generator=gen)
    state0 = torch.randn(3, 16, 3, generator=gen)
    prefill, prefill_state = causal_conv1d_ref(
        x, weight, bias, conv_state=state0, return_final_state=True
    )
    state = state0.clone()
    for t in range(x.shape[-1]):
        out, state = causal_conv1d_update_ref(x[..., t], state, weight, bias)
        assert torch.equal(out, prefill[..., t])
    assert torch.equal(state, prefill_state)
    assert torch.equal(state0, state0.clone())  # functional: input state untouched


def _scan_inputs(dtype, batch=2, channels=20, n_state=12, length=9, seed=0):
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, channels, length, generator=gen)
    delta = 0.5 * torch.randn(batch, channels, length, generator=gen)
    delta[0, 0, 0] = 25.0  # above the softplus threshold
    A = -torch.exp(torch.randn(channels, n_state, generator=gen))
    B = torch.randn(batch, n_state, length, generator=gen)
    C = torch.randn(batch, n_state, length, generator=gen)
    D = torch.randn(channels, generator=gen)
    z = torch.randn(batch, channels, length, generator=gen)
    delta_bias = torch.randn(channels, generator=gen) - 2.0
    h0 = torch.randn(batch, channels, n_state, generator=gen)
    cast = [t.to(dtype) for t in (u, delta, A, B, C, D, z, delta_bias)]
    return (*cast, h0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("length", [1, 9])
@pytest.mark.parametrize("options", ["all", "bare", "state"])
def test_selective_scan_matches_float64(dtype, length, options):
    u, delta, A, B, C, D, z, delta_bias, h0 = _scan_inputs(dtype, length=length)
    kwargs = {"D": D, "z": z, "delta_bias": delta_bias}
    if options == "bare":
        kwargs = {}
    initial = h0 if options == "state" else None
    y, last = selective_scan_ref(
        u, delta, A, B, C, **kwargs, return_last_state=True, initial_state=initial
    )
    expected_y, expected_last = scan_f64(u, delta, A, B, C, **kwargs, h0=initial)
    assert y.dtype == torch.float32 and y.shape == (2, length, 20)
    # float32 arithmetic on inputs that are exact in float64: float32-level agreement.
    assert max_rel_err(y, expected_y) < 2e-6
    assert max_rel_err(last, expected_last) < 2e-6


def test_selective_scan_without_softplus_and_no_steps():
    u, delta, A, B, C, *_ = _scan_inputs(torch.float32)
    delta = delta.abs() * 0.1
    y = selective_scan_ref(u, delta, A, B, C, delta_softplus=False)
    assert max_rel_err(y, scan_f64(u, delta, A, B, C, softplus=False)[0]) < 2e-6
    empty = selective_scan_ref(u[..., :0], delta[..., :0], A, B[..., :0], C[..., :0])
    assert empty.shape == (2, 0, 20)


def test_selective_state_update_reproduces_the_scan():
    u, delta, A, B, C, D, z, delta_bias, h0 = _scan_inputs(torch.float32, seed=5)
    y_scan, last = selective_scan_ref(
        u, delta, A, B, C, D, z, delta_bias, return_last_state=True, initial_state=h0
    )
    state = h0.clone()
    for t in range(u.shape[-1]):
        y_t, state = selective_state_update_ref(
            state, u[..., t], delta[..., t], A, B[..., t], C[..., t], D, z[..., t], delta_bias
        )
        torch.testing.assert_close(y_t, y_scan[:, t], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(state, last, rtol=1e-6, atol=1e-6)
    assert torch.equal(h0, _scan_inputs(torch.float32, seed=5)[-1])  # input not modified


def test_fp_ops_reject_bad_shapes():
    u, delta, A, B, C, _, _, delta_bias, _ = _scan_inputs(torch.float32)
    with pytest.raises(ValueError, match="B must have shape"):
        selective_scan_ref(u, delta, A, B[..., :3], C)
    with pytest.raises(ValueError, match="u must be"):
        selective_scan_ref(u[0], delta, A, B, C)
    with pytest.raises(ValueError, match="delta_bias must have shape"):
        selective_scan_ref(u, delta, A, B, C, delta_bias=delta_bias[:3])
    with pytest.raises(ValueError, match="initial_state must have shape"):
        selective_scan_ref(u, delta, A, B, C, initial_state=torch.zeros(2, 20, 5))
    with pytest.raises(ValueError, match="weight must have shape"):
        causal_conv1d_ref(u, torch.zeros(3, 4))
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d_ref(u, torch.zeros(20, 4), activation="relu")
    with pytest.raises(ValueError, match="conv_state must have shape"):
        causal_conv1d_update_ref(u[..., 0], torch.zeros(2, 20, 2), torch.zeros(20, 4))
    with pytest.raises(ValueError, match="dt must have shape"):
        selective_state_update_ref(
            torch.zeros(2, 20, 12), u[..., 0], delta, A, B[..., 0], C[..., 0]
        )


# --- model ------------------------------------------------------------------------------------


def test_state_dict_keys_are_the_mamba_ssm_layout():
    model = MambaLM(dataclasses.replace(SMALL, n_layer=2))
    E, D, N, R, K, V = 96, 48, 12, 3, 4, 104
    expected = {
        "backbone.embedding.weight": (V, D),
        "backbone.norm_f.weight": (D,),
        "lm_head.weight": (V, D),
    }
    for i in range(2):
        prefix = f"backbone.layers.{i}."
        expected |= {
            prefix + "norm.weight": (D,),
            prefix + "mixer.in_proj.weight": (2 * E, D),
            prefix + "mixer.conv1d.weight": (E, 1, K),
            prefix + "mixer.conv1d.bias": (E,),
            prefix + "mixer.x_proj.weight": (R + 2 * N, E),
            prefix + "mixer.dt_proj.weight": (E, R),
            prefix + "mixer.dt_proj.bias": (E,),
            prefix + "mixer.A_log": (E, N),
            prefix + "mixer.D": (E,),
            prefix + "mixer.out_proj.weight": (D, E),
        }
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected
    assert model.lm_head.weight is model.backbone.embedding.weight


def test_untied_head_is_separate_and_bias_keys_appear():
    model = MambaLM(VARIANTS["untied_bias"])
    keys = set(model.state_dict())
    assert model.lm_head.weight is not model.backbone.embedding.weight
    assert not torch.equal(model.lm_head.weight, model.backbone.embedding.weight)
    assert "backbone.layers.0.mixer.in_proj.bias" in keys
    assert "backbone.layers.0.mixer.out_proj.bias" in keys
    assert "backbone.layers.0.mixer.conv1d.bias" not in keys


def test_random_init_is_mamba_like_and_seeded():
    config = MambaConfig.from_preset("130m", n_layer=2)
    model = MambaLM(config, seed=0)
    mixer = model.backbone.layers[1].mixer
    torch.testing.assert_close(
        mixer.A_log, torch.log(torch.arange(1, 17, dtype=torch.float32)).expand(1536, 16)
    )
    dt = F.softplus(mixer.dt_proj.bias.double())
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    assert dt.std() > 0.01  # spread over the range, not a constant
    assert torch.equal(mixer.D, torch.ones(1536))
    ids = torch.randint(0, 50277, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all() and 0.05 < logits.std() < 10
    again = MambaLM(config, seed=0)
    other = MambaLM(config, seed=1)
    w = "backbone.layers.0.mixer.in_proj.weight"
    assert torch.equal(model.state_dict()[w], again.state_dict()[w])
    assert not torch.equal(model.state_dict()[w], other.state_dict()[w])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_mixer_matches_float64(variant):
    config = VARIANTS[variant]
    model = make_model(config, seed=2)
    mixer = model.backbone.layers[0].mixer
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(2, 7, config.d_model, generator=gen)
    state = (
        torch.randn(2, config.d_inner, config.d_conv - 1, generator=gen),
        torch.randn(2, config.d_inner, config.d_state, generator=gen),
    )
    with torch.no_grad():
        out, _ = mixer(hidden)
        out_from_state, _ = mixer(hidden, state)
    assert max_rel_err(out, mixer_f64(mixer, hidden)) < 1e-5
    assert max_rel_err(out_from_state, mixer_f64(mixer, hidden, state)) < 1e-5


def test_mixer_stages_compose_to_forward():
    model = make_model(SMALL, seed=3)
    mixer = model.backbone.layers[1].mixer
    hidden = torch.randn(2, 5, SMALL.d_model, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        x, z = mixer.project_in(hidden)
        u, _ = mixer.conv(x)
        dt_low, B, C = mixer.project_x(u)
        delta_raw = mixer.project_dt(dt_low)
        y, _ = mixer.scan(u, delta_raw, B, C)
        gated = mixer.gate(y, z)
        out = mixer.project_out(gated)
        fused = selective_scan_ref(u, delta_raw, mixer.A(), B, C, mixer.D, z, mixer.dt_proj.bias)
        expected, _ = mixer(hidden)
    assert x.shape == z.shape == u.shape == delta_raw.shape == (2, 96, 5)
    assert dt_low.shape == (2, 5, 3) and B.shape == C.shape == (2, 12, 5)
    assert y.shape == (2, 5, 96) and y.dtype == torch.float32
    assert torch.equal(out, expected)
    torch.testing.assert_close(gated, fused, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_lm_logits_match_float64(variant):
    config = VARIANTS[variant]
    model = make_model(config, seed=5)
    ids = torch.randint(0, config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        output = model(ids)
    assert isinstance(output, LMOutput)
    assert output.logits.shape == (2, 6, config.padded_vocab_size)
    assert output.logits.dtype == torch.float32
    assert max_rel_err(output.logits, lm_f64(model, ids)) < 1e-5


@pytest.mark.parametrize("length", [1, 2, 5, 9])
@pytest.mark.parametrize("variant", ["default", "k3_rank5_fp16res"])
def test_step_decode_reproduces_forward(length, variant):
    config = VARIANTS[variant]
    model = make_model(config, seed=7)
    ids = torch.randint(0, config.vocab_size, (2, length), generator=torch.Generator())
    with torch.no_grad():
        full = model(ids)
        state = model.init_state(2)
        for t in range(length):
            before = [(c.clone(), s.clone()) for c, s in state]
            logits, new_state = model.step(ids[:, t], state)
            for (c0, s0), (c, s) in zip(before, state):
                assert torch.equal(c0, c) and torch.equal(s0, s)  # state not modified
            assert max_rel_err(logits, full.logits[:, t]) < 1e-5
            state = new_state
    # The states hold in_proj outputs computed with other matrix shapes: equal up to rounding.
    for (conv_a, ssm_a), (conv_b, ssm_b) in zip(state, full.state):
        assert max_rel_err(conv_a, conv_b) < 1e-5
        assert max_rel_err(ssm_a, ssm_b) < 1e-5


@pytest.mark.parametrize("split", [1, 3, 5])
def test_forward_continues_from_a_state(split):
    model = make_model(SMALL, seed=8)
    ids = torch.randint(0, SMALL.vocab_size, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids).logits
        first = model(ids[:, :split])
        second = model(ids[:, split:], state=first.state)
    joined = torch.cat([first.logits, second.logits], dim=1)
    assert max_rel_err(joined, full) < 1e-5


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float16, 4e-3), (torch.bfloat16, 2e-2)])
def test_half_precision_models_track_float32(dtype, tolerance):
    model = make_model(SMALL, seed=9)
    ids = torch.randint(0, SMALL.vocab_size, (2, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = lm_f64(model, ids)
        half = model.to(dtype)
        logits = half(ids).logits
        step_logits, _ = half.step(ids[:, 0])
        layer = half.backbone.layers[0]
        _, residual, _ = layer(half.backbone.embedding(ids), None)
    assert half.dtype == dtype and logits.dtype == torch.float32
    # Above 1e-5: it really ran in low precision (float32 agrees to ~1e-7).
    assert 1e-5 < max_rel_err(logits, reference) < tolerance
    assert max_rel_err(step_logits, logits[:, 0]) < tolerance
    assert residual.dtype == torch.float32  # residual_in_fp32


def test_residual_stays_in_model_dtype_without_residual_in_fp32():
    config = dataclasses.replace(SMALL, residual_in_fp32=False)
    model = make_model(config).to(torch.float16)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        _, residual, _ = model.backbone.layers[0](model.backbone.embedding(ids), None)
    assert residual.dtype == torch.float16


# --- generation -------------------------------------------------------------------------------


# Untied, with a head that gives logits of std ~1: varied greedy paths, sampling that matters.
GEN = dataclasses.replace(SMALL, tie_embeddings=False)


@pytest.fixture(scope="module")
def gen_model():
    return make_model(GEN, seed=11, head_scale=8.0)


def _prompt(batch=2, length=4, seed=0):
    return torch.randint(
        0, SMALL.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed)
    )


def test_greedy_generation_is_deterministic_and_argmax(gen_model):
    prompt = _prompt()
    out = gen_model.generate(prompt, max_new_tokens=6)
    assert out.shape == (2, 10) and torch.equal(out[:, :4], prompt)
    assert torch.equal(out, gen_model.generate(prompt, max_new_tokens=6))
    with torch.no_grad():
        logits = gen_model(out).logits[:, 3:-1, : SMALL.vocab_size]
    assert torch.equal(out[:, 4:], logits.argmax(-1))
    assert torch.equal(gen_model.generate(prompt, 0), prompt)


def test_sampling_is_reproducible_with_a_seed(gen_model):
    prompt = _prompt(seed=1)
    kwargs = {"max_new_tokens": 8, "temperature": 1.5}
    first = gen_model.generate(prompt, seed=123, **kwargs)
    assert torch.equal(first, gen_model.generate(prompt, seed=123, **kwargs))
    others = [gen_model.generate(prompt, seed=seed, **kwargs) for seed in (124, 125)]
    assert any(not torch.equal(first, other) for other in others)
    greedy = gen_model.generate(prompt, max_new_tokens=8)
    assert not torch.equal(first, greedy)


def test_top_k_and_top_p_restrict_the_choices(gen_model):
    prompt = _prompt(seed=2)
    greedy = gen_model.generate(prompt, max_new_tokens=5)
    assert torch.equal(gen_model.generate(prompt, 5, temperature=1.0, top_k=1, seed=0), greedy)
    assert torch.equal(gen_model.generate(prompt, 5, temperature=1.0, top_p=1e-6, seed=0), greedy)
    sampled = gen_model.generate(prompt, 12, temperature=3.0, top_k=3, seed=4)
    with torch.no_grad():
        logits = gen_model(sampled).logits[:, 3:-1, : SMALL.vocab_size]
    top3 = logits.topk(3, dim=-1).indices
    assert (top3 == sampled[:, 4:, None]).any(-1).all()
    assert not torch.equal(sampled[:, 4:], top3[..., 0])  # not simply greedy


def test_generation_never_emits_padding_ids():
    model = make_model(GEN, seed=12, head_scale=8.0)
    with torch.no_grad():  # make the padding rows (101..103) the most likely ones
        model.lm_head.weight[101:] = 10 * model.lm_head.weight[:3]
    prompt = _prompt(seed=3)
    out = model.generate(prompt, max_new_tokens=6)
    with torch.no_grad():
        logits = model(out).logits[:, 3:-1]
    assert (logits.argmax(-1) >= 101).any()  # unrestricted argmax would pick padding
    assert (out < 101).all()
    assert torch.equal(out[:, 4:], logits[..., :101].argmax(-1))


def test_generation_stops_at_eos(gen_model):
    prompt = _prompt(batch=1, seed=4)
    first = int(gen_model.generate(prompt, 1)[0, -1])
    out = gen_model.generate(prompt, 5, eos_token_id=first)
    assert out.shape == (1, 5) and int(out[0, -1]) == first


# --- bad inputs -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ids", "error", "message"),
    [
        (torch.tensor([[1, 104]]), ValueError, r"in \[0, 104\)"),
        (torch.tensor([[-1, 2]]), ValueError, r"in \[0, 104\)"),
        (torch.tensor([[1.0, 2.0]]), TypeError, "int64 or int32"),
        (torch.tensor([1, 2]), ValueError, r"\(batch, seqlen\)"),
        (torch.zeros(2, 0, dtype=torch.long), ValueError, "must not be empty"),
        ([[1, 2]], TypeError, "torch.Tensor"),
    ],
)
def test_forward_rejects_bad_token_ids(gen_model, ids, error, message):
    with pytest.raises(error, match=message):
        gen_model(ids)


def test_step_and_state_errors(gen_model):
    with pytest.raises(ValueError, match=r"\(batch,\)"):
        gen_model.step(torch.tensor([[1]]))
    state = gen_model.init_state(2)
    with pytest.raises(ValueError, match="conv_state must have shape"):
        gen_model.step(torch.tensor([1, 2, 3]), state)
    with pytest.raises(ValueError, match="list of 2"):
        gen_model.step(torch.tensor([1, 2]), state[:1])
    bad = [state[0], (state[1][0], torch.zeros(2, 96, 5))]
    with pytest.raises(ValueError, match=r"state\[1\] ssm_state must have shape"):
        gen_model(torch.tensor([[1], [2]]), state=bad)
    with pytest.raises(ValueError, match="batch_size"):
        gen_model.init_state(0)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"max_new_tokens": -1}, ValueError, "max_new_tokens"),
        ({"max_new_tokens": 2.0}, TypeError, "max_new_tokens"),
        ({"max_new_tokens": 2, "temperature": -1.0}, ValueError, "temperature"),
        ({"max_new_tokens": 2, "temperature": float("inf")}, ValueError, "temperature"),
        ({"max_new_tokens": 2, "top_k": 0}, ValueError, "top_k"),
        ({"max_new_tokens": 2, "top_p": 1.5}, ValueError, "top_p"),
        ({"max_new_tokens": 2, "top_p": 0.0}, ValueError, "top_p"),
        ({"max_new_tokens": 2, "seed": "x"}, TypeError, "seed"),
    ],
)
def test_generate_rejects_bad_arguments(gen_model, kwargs, error, message):
    with pytest.raises(error, match=message):
        gen_model.generate(_prompt(), **kwargs)


def test_model_constructor_errors():
    with pytest.raises(TypeError, match="MambaConfig"):
        MambaLM({"d_model": 8})
    with pytest.raises(ValueError, match="dtype"):
        MambaLM(SMALL, dtype=torch.float64)


# --- CUDA -------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("dtype", "tolerance"),
    [(torch.float32, 1e-5), (torch.float16, 4e-3), (torch.bfloat16, 2e-2)],
)
def test_cuda_model_matches_float64_and_decodes(dtype, tolerance):
    model = make_model(VARIANTS["untied_bias"], seed=13)
    ids = torch.randint(0, 101, (2, 7), generator=torch.Generator().manual_seed(5))
    reference = lm_f64(model, ids)
    cuda = model.to(device="cuda", dtype=dtype)
    ids = ids.cuda()
    with torch.no_grad():
        output = cuda(ids)
        state = cuda.init_state(2)
        for t in range(ids.shape[1]):
            logits, state = cuda.step(ids[:, t], state)
            assert logits.device.type == "cuda"
            assert max_rel_err(logits.cpu(), output.logits[:, t].cpu()) < tolerance
    assert output.logits.device.type == "cuda" and output.logits.dtype == torch.float32
    assert max_rel_err(output.logits.cpu(), reference) < tolerance
    assert all(c.is_cuda and s.is_cuda and s.dtype == torch.float32 for c, s in output.state)


@pytest.mark.gpu
def test_cuda_generation_matches_cpu():
    cpu_model = make_model(GEN, seed=11, head_scale=8.0)
    cuda_model = make_model(GEN, seed=11, head_scale=8.0).cuda()
    prompt = _prompt(seed=5)
    for kwargs in ({}, {"temperature": 1.0, "top_k": 20, "top_p": 0.9, "seed": 7}):
        on_cpu = cpu_model.generate(prompt, 8, **kwargs)
        on_cuda = cuda_model.generate(prompt.cuda(), 8, **kwargs)
        assert on_cuda.is_cuda
        assert torch.equal(on_cuda.cpu(), on_cpu)

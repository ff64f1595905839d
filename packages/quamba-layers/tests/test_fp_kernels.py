"""The kernel path of the float model (fp_kernels) and CUDA-graph decoding (cuda_graph).

CPU tests: the recorded choice and its errors, the reference path unchanged by default, the glue
of the kernel path run against stand-in kernels (the fp_ops references behind the real wrappers'
argument checks), and the errors of GraphedStep / generate(cuda_graph=True) without a GPU.

GPU tests (@pytest.mark.gpu), on the same device as the reference path:
- mixer stages, exact scan: bit-identical to the reference path (prefill from zero or from a
  state, L = 1 and odd lengths, decode steps);
- fast float16/bfloat16 scan and the whole model: the kernel path's error against an
  independent float64 model is at most TOLERANCE_FACTOR times the reference path's (+ a float32
  floor); RMSNorm within 1 ulp of its output dtype;
- prefill + decode continues the prefill; generate gives the same tokens with and without the
  CUDA graph; a graph replay gives the eager step's bits; capture errors are clear.
The measured maxima are printed ("[fp_kernels]" lines; run pytest with -s).
"""

from __future__ import annotations

import copy
import dataclasses
import types

import pytest
import torch
import torch.nn.functional as F

from quamba_layers import fp_kernels, fp_ops, reference_ops
from quamba_layers.config import MambaConfig
from quamba_layers.cuda_graph import GraphCaptureError, GraphedStep
from quamba_layers.model import MambaLM

SMALL = MambaConfig(d_model=48, n_layer=2, vocab_size=101, d_state=12)
VARIANT = dataclasses.replace(
    SMALL, d_conv=3, dt_rank=5, residual_in_fp32=False, bias=True, conv_bias=False, d_state=16
)
# Kernel path vs float64 error, relative to the reference path's error (same dtype).
TOLERANCE_FACTOR = 2.0


def make_model(config: MambaConfig, dtype=torch.float32, device="cpu", seed=0) -> MambaLM:
    """A random model with every parameter away from its trivial init, then cast and moved."""
    model = MambaLM(config, seed=seed).eval()
    generator = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("norm.weight", "norm_f.weight", ".D")):
                param.copy_(1 + 0.3 * torch.randn(param.shape, generator=generator))
            elif name.endswith(("in_proj.bias", "out_proj.bias", "conv1d.bias")):
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
        model.backbone.embedding.weight.mul_(20.0)
    return model.to(device=device, dtype=dtype)


def random_ids(config: MambaConfig, batch: int, length: int, seed: int, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (batch, length), generator=generator).to(device)


class reference_path:
    """Context manager: run `model` on its reference ops, whatever use_kernels chose."""

    def __init__(self, model: MambaLM) -> None:
        self.modules = [m for m in model.modules() if hasattr(m, "kernel_ops")]

    def __enter__(self):
        self.saved = [m.kernel_ops for m in self.modules]
        for m in self.modules:
            m.kernel_ops = None

    def __exit__(self, *exc):
        for m, ops in zip(self.modules, self.saved):
            m.kernel_ops = ops


# --- CPU: the choice, the default, errors -----------------------------------------------------


def test_reference_is_the_default_and_recorded():
    model = make_model(SMALL)
    record = model.implementations()
    assert record["path"] == "reference"
    assert record["requested"] == "reference (default)"
    assert record["conv1d"] == record["selective_scan"] == fp_kernels.REFERENCE
    assert all(m.kernel_ops is None for m in model.modules() if hasattr(m, "kernel_ops"))


@pytest.mark.parametrize("prefer", ["auto", "reference"])
def test_auto_on_cpu_keeps_the_reference_path_bit_for_bit(prefer):
    plain = make_model(VARIANT, seed=3)
    chosen = make_model(VARIANT, seed=3)
    assert chosen.use_kernels(prefer) is chosen
    record = chosen.implementations()
    assert record["path"] == "reference" and record["requested"] == prefer
    if prefer == "auto":
        assert "cpu" in record["reason"]
    ids = random_ids(VARIANT, 2, 9, seed=1)
    assert torch.equal(plain(ids).logits, chosen(ids).logits)
    assert torch.equal(plain.generate(ids, 4), chosen.generate(ids, 4))


def test_kernel_request_without_cuda_fails_with_the_reason():
    model = make_model(SMALL)
    with pytest.raises(RuntimeError, match="cannot run: the model is on cpu"):
        model.use_kernels("kernel")
    assert model.implementations()["path"] == "reference"


def test_bad_arguments_are_refused():
    model = make_model(SMALL)
    with pytest.raises(ValueError, match="prefer must be one of"):
        model.use_kernels("cuda")
    with pytest.raises(TypeError, match="exact_scan must be a bool"):
        model.use_kernels("auto", exact_scan="yes")


@pytest.mark.parametrize(
    "change,reason",
    [({"d_conv": 5}, "d_conv = 5"), ({"d_state": 65}, "d_state = 65")],
)
def test_unsupported_configs_are_reported(change, reason):
    config = dataclasses.replace(SMALL, **change)
    usable, why = fp_kernels.kernel_support(config, "cuda")
    assert not usable and reason in why


# --- CPU: the kernel-path glue against stand-in kernels ---------------------------------------


def _checked_by_real_wrapper(call) -> None:
    """Run a real quamba_kernels wrapper for its argument checks only (types, dtypes, shapes,
    contiguity), which come before its device checks; it must refuse these CPU tensors."""
    import quamba_kernels

    try:
        call()
    except quamba_kernels.KernelsUnavailable:
        return
    except ValueError as exc:
        if "CUDA tensor" in str(exc):
            return
        raise
    raise AssertionError("the real wrapper accepted CPU tensors")


def _stand_in_kernels():
    """quamba_kernels' float ops computed by the fp_ops references, after the real checks."""
    qk = pytest.importorskip("quamba_kernels")

    def causal_conv1d(x, weight, bias=None, activation="silu"):
        _checked_by_real_wrapper(lambda: qk.causal_conv1d(x, weight, bias, activation))
        return fp_ops.causal_conv1d_ref(x, weight[:, 0], bias, activation)

    def causal_conv1d_update(x, conv_state, weight, bias=None, activation="silu"):
        _checked_by_real_wrapper(
            lambda: qk.causal_conv1d_update(x, conv_state, weight, bias, activation)
        )
        out, new = fp_ops.causal_conv1d_update_ref(x, conv_state, weight[:, 0], bias, activation)
        conv_state.copy_(new)  # in place, as the kernel
        return out, conv_state

    def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, **kw):
        _checked_by_real_wrapper(
            lambda: qk.selective_scan(u, delta, A, B, C, D, z, delta_bias, **kw)
        )
        y, h = fp_ops.selective_scan_ref(
            u, delta, A, B, C, D, z, delta_bias, True, True, kw["initial_state"]
        )
        return y.to(u.dtype), h

    def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, **kw):
        _checked_by_real_wrapper(
            lambda: qk.selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, **kw)
        )
        y, h = fp_ops.selective_state_update_ref(state, x, dt, A, B, C, D, z, dt_bias)
        state.copy_(h)
        return y.to(x.dtype), state

    def rmsnorm(x, residual, weight, eps, *, out_dtype):
        _checked_by_real_wrapper(lambda: qk.rmsnorm(x, residual, weight, eps, out_dtype=out_dtype))
        y, r = reference_ops.rmsnorm(x, residual, weight, eps)
        return y.to(out_dtype), r

    return types.SimpleNamespace(
        require=lambda: None,
        causal_conv1d=causal_conv1d,
        causal_conv1d_update=causal_conv1d_update,
        selective_scan=selective_scan,
        selective_state_update=selective_state_update,
        rmsnorm=rmsnorm,
    )


@pytest.fixture
def stand_in(monkeypatch):
    monkeypatch.setattr(fp_kernels, "_kernel_module", _stand_in_kernels)
    monkeypatch.setattr(fp_kernels, "kernel_support", lambda config, device: (True, ""))
    _reference_gemm_forms(monkeypatch)


def _reference_gemm_forms(monkeypatch):
    """The kernel path's GEMMs in the reference's form (F.linear, then a transposed view), so that
    everything else is checked bit for bit: cuBLAS may sum weight @ x^T in another order than
    F.linear (the forms are tested against each other in test_transposed_gemm_forms_...)."""
    monkeypatch.setattr(
        fp_kernels,
        "_seq_last_linear",
        lambda x, weight, bias=None: F.linear(x, weight, bias).transpose(1, 2),
    )
    monkeypatch.setattr(
        fp_kernels,
        "_seq_last_halves",
        lambda x, weight, bias=None: F.linear(x, weight, bias).transpose(1, 2).chunk(2, dim=1),
    )
    monkeypatch.setattr(
        fp_kernels, "_token_major_linear", lambda u, weight: F.linear(u.transpose(1, 2), weight)
    )


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("bias", [False, True])
def test_transposed_gemm_forms_equal_the_linear_layer(batch, bias):
    """weight @ x^T (the kernel path's in_proj / dt_proj) and u^T @ weight^T (x_proj) are the same
    products as F.linear: equal in float64 (exact here: small integers), within rounding in
    float32."""
    g = torch.Generator().manual_seed(batch + 10 * bias)
    x = torch.randint(-8, 9, (batch, 7, 24), generator=g).double()
    w = torch.randint(-8, 9, (40, 24), generator=g).double()
    b = torch.randint(-8, 9, (40,), generator=g).double() if bias else None
    got = fp_kernels._seq_last_linear(x, w, b)
    assert got.shape == (batch, 40, 7) and got.is_contiguous()
    assert torch.equal(got, F.linear(x, w, b).transpose(1, 2))
    halves = fp_kernels._seq_last_halves(x, w, b)  # in_proj's x and z
    assert all(h.is_contiguous() for h in halves)
    assert all(torch.equal(h, r) for h, r in zip(halves, got.chunk(2, dim=1), strict=True))
    u = x.transpose(1, 2).contiguous()  # (B, K, L)
    assert torch.equal(fp_kernels._token_major_linear(u, w), F.linear(x, w))
    xf, wf = torch.randn(batch, 7, 24, generator=g), torch.randn(40, 24, generator=g)
    torch.testing.assert_close(
        fp_kernels._seq_last_linear(xf, wf), F.linear(xf, wf).transpose(1, 2), rtol=1e-5, atol=1e-5
    )


def _random_layer_state(model: MambaLM, batch: int, seed: int):
    config = model.config
    g = torch.Generator().manual_seed(seed)
    conv = torch.randn(batch, config.d_inner, config.d_conv - 1, generator=g).to(model.dtype)
    ssm = torch.randn(batch, config.d_inner, config.d_state, generator=g)
    return conv, ssm


@pytest.mark.parametrize("config", [SMALL, VARIANT], ids=["small", "variant"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("batch,length", [(1, 1), (2, 2), (3, 9)])
def test_kernel_glue_matches_the_reference_mixer(stand_in, config, dtype, batch, length):
    model = make_model(config, dtype=dtype, seed=length)
    model.use_kernels("kernel", exact_scan=True)
    assert model.implementations()["path"] == "kernel"
    mixer = model.backbone.layers[1].mixer
    g = torch.Generator().manual_seed(batch * 100 + length)
    hidden = torch.randn(batch, length, config.d_model, generator=g).to(dtype)
    for state in (None, _random_layer_state(model, batch, seed=length)):
        kept = None if state is None else tuple(t.clone() for t in state)
        out, (conv, ssm) = mixer(hidden, state)
        with reference_path(model):
            want, (want_conv, want_ssm) = mixer(hidden, state)
        assert torch.equal(out, want) and torch.equal(conv, want_conv)
        assert torch.equal(ssm, want_ssm)
        if state is not None:
            assert all(torch.equal(a, b) for a, b in zip(state, kept))  # not modified
    state = _random_layer_state(model, batch, seed=5)
    kept = tuple(t.clone() for t in state)
    out, new = mixer.step(hidden[:, 0], state)
    with reference_path(model):
        want, want_new = mixer.step(hidden[:, 0], state)
    assert torch.equal(out, want)
    assert all(torch.equal(a, b) for a, b in zip(new, want_new))
    assert all(torch.equal(a, b) for a, b in zip(state, kept))


def test_kernel_glue_whole_model_and_generate(stand_in):
    model = make_model(VARIANT, seed=11)
    model.use_kernels("kernel")
    ids = random_ids(VARIANT, 2, 7, seed=2)
    with reference_path(model):
        want = model(ids).logits
        want_tokens = model.generate(ids, 5)
    got = model(ids).logits
    # Only RMSNorm differs (float64 mean of squares): a few float32 ulps.
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert torch.equal(model.generate(ids, 5, cuda_graph=False), want_tokens)
    assert model.implementations()["selective_scan"].endswith("exact")  # float32


# --- CPU: CUDA-graph errors -------------------------------------------------------------------


def test_graphed_step_refuses_cpu_tensors_and_bad_arguments():
    model = make_model(SMALL)
    ids = torch.tensor([1, 2])
    state = model.init_state(2)
    with pytest.raises(ValueError, match="CUDA graphs need CUDA tensors"):
        GraphedStep(model.step_unchecked, ids, state)
    with pytest.raises(TypeError, match="step must be callable"):
        GraphedStep("step", ids, state)
    with pytest.raises(ValueError, match="warmup_steps"):
        GraphedStep(model.step_unchecked, ids, state, warmup_steps=0)
    with pytest.raises(ValueError, match=r"shape \(batch,\)"):
        GraphedStep(model.step_unchecked, ids[None], state)
    with pytest.raises(TypeError, match="integer tensor"):
        GraphedStep(model.step_unchecked, ids.float(), state)


def test_generate_cuda_graph_option_on_cpu():
    model = make_model(SMALL)
    ids = random_ids(SMALL, 1, 3, seed=0)
    with pytest.raises(ValueError, match="cuda_graph=True needs a model on a CUDA device"):
        model.generate(ids, 3, cuda_graph=True)
    with pytest.raises(TypeError, match="cuda_graph must be None or a bool"):
        model.generate(ids, 3, cuda_graph="auto")
    assert torch.equal(model.generate(ids, 3, cuda_graph=False), model.generate(ids, 3))


# --- GPU --------------------------------------------------------------------------------------

DEVICE = "cuda"
GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _report(name: str, **values) -> None:
    text = " ".join(
        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()
    )
    print(f"[fp_kernels] {name}: {text}")


def _gpu_model(config, dtype, seed=0, exact_scan=False) -> MambaLM:
    model = make_model(config, dtype=dtype, device=DEVICE, seed=seed)
    return model.use_kernels("kernel", exact_scan=exact_scan)


def _lm_f64(model: MambaLM, ids: torch.Tensor) -> torch.Tensor:
    """Logits in float64 from the parameters alone (F.conv1d, F.softplus, plain sums)."""
    config = model.config
    hidden = model.backbone.embedding.weight.double()[ids]
    residual = None

    def norm(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps) * weight

    for layer in model.backbone.layers:
        p = {k: v.detach().double() for k, v in layer.named_parameters()}
        residual = hidden if residual is None else residual + hidden
        x_in = norm(residual, p["norm.weight"])
        E, N, R = config.d_inner, config.d_state, layer.mixer.dt_rank
        xz = F.linear(x_in, p["mixer.in_proj.weight"], p.get("mixer.in_proj.bias"))
        x, z = xz[..., :E].transpose(1, 2), xz[..., E:]
        x = F.pad(x, (config.d_conv - 1, 0))
        u = F.silu(F.conv1d(x, p["mixer.conv1d.weight"], p.get("mixer.conv1d.bias"), groups=E))
        u = u.transpose(1, 2)  # (B, L, E)
        dbl = F.linear(u, p["mixer.x_proj.weight"])
        dt, B, C = dbl[..., :R], dbl[..., R : R + N], dbl[..., R + N :]
        delta = F.softplus(F.linear(dt, p["mixer.dt_proj.weight"], p["mixer.dt_proj.bias"]))
        A = -torch.exp(p["mixer.A_log"])
        h = torch.zeros(ids.shape[0], E, N, dtype=torch.float64, device=ids.device)
        ys = []
        for t in range(ids.shape[1]):
            d_t = delta[:, t, :, None]
            h = torch.exp(d_t * A) * h + (d_t * B[:, t, None, :]) * u[:, t, :, None]
            ys.append((h * C[:, t, None, :]).sum(-1))
        y = (torch.stack(ys, 1) + u * p["mixer.D"]) * F.silu(z)
        hidden = F.linear(y, p["mixer.out_proj.weight"], p.get("mixer.out_proj.bias"))
    residual = residual + hidden
    normed = norm(residual, model.backbone.norm_f.weight.double())
    return F.linear(normed, model.lm_head.weight.double())


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max())


def _ulp(x: torch.Tensor, dtype) -> torch.Tensor:
    finfo = torch.finfo(dtype)
    mag = x.double().abs().clamp_min(finfo.tiny)
    return torch.exp2(torch.floor(torch.log2(mag))) * finfo.eps


@pytest.mark.gpu
@pytest.mark.parametrize("config", [SMALL, VARIANT], ids=["small", "variant"])
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("batch,length", [(1, 1), (3, 7), (2, 45)])
def test_gpu_mixer_exact_scan_is_bit_identical(config, dtype, batch, length, monkeypatch):
    _reference_gemm_forms(monkeypatch)
    model = _gpu_model(config, dtype, seed=length, exact_scan=True)
    mixer = model.backbone.layers[0].mixer
    g = torch.Generator().manual_seed(length * 31 + batch)
    hidden = torch.randn(batch, length, config.d_model, generator=g).to(DEVICE, dtype)
    states = [None, tuple(t.to(DEVICE) for t in _random_layer_state(model, batch, 1))]
    for state in states:
        out, new = mixer(hidden, state)
        with reference_path(model):
            want, want_new = mixer(hidden, state)
        assert torch.equal(out, want), f"prefill out differs (state {state is not None})"
        assert all(torch.equal(a, b) for a, b in zip(new, want_new))
    state = new
    for t in range(3):
        out, new = mixer.step(hidden[:, t % length], state)
        with reference_path(model):
            want, want_new = mixer.step(hidden[:, t % length], state)
        assert torch.equal(out, want), f"decode step {t} differs"
        assert all(torch.equal(a, b) for a, b in zip(new, want_new))
        state = new


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@torch.no_grad()
def test_gpu_rmsnorm_within_one_ulp(dtype):
    model = _gpu_model(SMALL, dtype, seed=2)
    norm = model.backbone.layers[1].norm
    g = torch.Generator().manual_seed(9)
    for x_dtype in {dtype, torch.float32}:
        x = (3 * torch.randn(4, 33, SMALL.d_model, generator=g)).to(DEVICE, x_dtype)
        got = norm(x)
        with reference_path(model):
            want = norm(x)
        x64 = x.double()
        y64 = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight.double()
        ulps = float(((got.double() - want.double()).abs() / _ulp(want, dtype)).max())
        ulps64 = float(((got.double() - y64).abs() / _ulp(y64, dtype)).max())
        _report(f"rmsnorm {dtype} x={x_dtype}", ulps_vs_reference=ulps, ulps_vs_f64=ulps64)
        bound = 1.0 if dtype != torch.float32 else 8.0
        assert got.dtype == want.dtype and ulps <= bound and ulps64 <= bound + 0.5


@pytest.mark.gpu
@pytest.mark.parametrize("config", [SMALL, VARIANT], ids=["small", "variant"])
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("batch,length", [(1, 1), (2, 13), (3, 64)])
def test_gpu_model_error_vs_float64_no_worse_than_reference(config, dtype, batch, length):
    model = _gpu_model(config, dtype, seed=batch + length)
    ids = random_ids(config, batch, length, seed=length, device=DEVICE)
    want64 = _lm_f64(model, ids)
    got = model(ids).logits
    with reference_path(model):
        ref = model(ids).logits
    err_kernel, err_ref = _max_rel(got, want64), _max_rel(ref, want64)
    _report(
        f"model N={config.d_state} K={config.d_conv} {dtype} B={batch} L={length}",
        kernel_vs_ref=_max_rel(got, ref),
        kernel_vs_f64=err_kernel,
        ref_vs_f64=err_ref,
    )
    assert err_kernel <= TOLERANCE_FACTOR * err_ref + 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("length", [1, 6, 31])
def test_gpu_prefill_then_decode_continues_the_prefill(dtype, length):
    config = VARIANT
    model = _gpu_model(config, dtype, seed=length)
    ids = random_ids(config, 2, length + 5, seed=3, device=DEVICE)
    full = model(ids).logits
    out = model(ids[:, :length])
    logits, state = out.logits, out.state
    # Prefill in two chunks (continuing from a state) equals one prefill up to GEMM shapes.
    half = max(1, length // 2)
    first = model(ids[:, :half])
    if half < length:
        second = model(ids[:, half:length], first.state)
        chunked = torch.cat([first.logits, second.logits], 1)
    else:
        chunked = first.logits
    steps = []
    for t in range(length, length + 5):
        step_logits, state = model.step(ids[:, t], state)
        steps.append(step_logits)
    decoded = torch.cat([logits, torch.stack(steps[:-1], 1)], 1)
    err_step = _max_rel(decoded, full[:, : length + 4])
    err_chunk = _max_rel(chunked, full[:, :length])
    _report(f"prefill+decode {dtype} L={length}", step_vs_prefill=err_step, chunks=err_chunk)
    # Measured on an H100: 0 for float16/bfloat16, <= 1.7e-7 for float32.
    bound = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    assert err_step <= bound and err_chunk <= bound


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("use_kernels", [True, False])
def test_gpu_graph_replay_matches_eager_step_bit_for_bit(dtype, use_kernels):
    model = _gpu_model(SMALL, dtype, seed=4)
    if not use_kernels:
        model.use_kernels("reference")
    ids = random_ids(SMALL, 3, 12, seed=4, device=DEVICE)
    state = model(ids[:, :5]).state
    graphed = GraphedStep(model.step_unchecked, ids[:, 5], state)
    assert graphed.batch_size == 3
    eager_state = state
    for t in range(5, 12):
        eager_logits, eager_state = model.step(ids[:, t], eager_state)
        logits = graphed(ids[:, t])
        assert torch.equal(logits, eager_logits), f"replay {t} differs"
    for graph_layer, eager_layer in zip(graphed.state, eager_state):
        assert all(torch.equal(a, b) for a, b in zip(graph_layer, eager_layer))
    # set_state restarts the graph from another state.
    graphed.set_state(state)
    assert torch.equal(graphed(ids[:, 5]), model.step(ids[:, 5], state)[0])
    with pytest.raises(ValueError, match="captured for batch size 3"):
        graphed(ids[:2, 5])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("temperature,eos", [(0.0, None), (0.8, 7)])
def test_gpu_generate_same_tokens_with_and_without_graph(dtype, temperature, eos):
    model = _gpu_model(SMALL, dtype, seed=5)
    ids = random_ids(SMALL, 3, 11, seed=6, device=DEVICE)
    kwargs = dict(temperature=temperature, top_k=20, seed=1, eos_token_id=eos)
    eager = model.generate(ids, 16, cuda_graph=False, **kwargs)
    graphed = model.generate(ids, 16, **kwargs)  # None: graph with the kernel path
    assert torch.equal(graphed, eager)
    with reference_path(model):
        reference = model.generate(ids, 16, cuda_graph=True, **kwargs)
        assert torch.equal(reference, model.generate(ids, 16, cuda_graph=False, **kwargs))


@pytest.mark.gpu
def test_gpu_capture_error_names_host_synchronisation():
    model = _gpu_model(SMALL, torch.float16)
    ids = random_ids(SMALL, 2, 4, seed=7, device=DEVICE)
    state = model(ids).state

    def step_with_sync(token_ids, layer_state):
        logits, new_state = model.step_unchecked(token_ids, layer_state)
        if bool((logits > 1e30).any()):  # a host synchronisation
            logits = logits * 0
        return logits, new_state

    stream = torch.cuda.current_stream()
    with pytest.raises(GraphCaptureError, match="host synchronisation"):
        GraphedStep(step_with_sync, ids[:, -1], state)
    assert torch.cuda.current_stream() == stream
    # The process recovers: a valid step is captured afterwards.
    graphed = GraphedStep(model.step_unchecked, ids[:, -1], state)
    assert torch.equal(graphed(ids[:, 0]), model.step(ids[:, 0], state)[0])


@pytest.mark.gpu
def test_gpu_choice_is_recorded_and_unsupported_config_falls_back():
    model = make_model(SMALL, torch.float16, DEVICE).use_kernels()
    record = model.implementations()
    assert record["path"] == "kernel" and record["selective_scan"].endswith("fast")
    assert record["linear"] == "torch (cuBLAS)"
    wide = make_model(dataclasses.replace(SMALL, d_state=65), torch.float16, DEVICE)
    assert wide.use_kernels("auto").implementations()["path"] == "reference"
    assert "d_state = 65" in wide.implementations()["reason"]
    with pytest.raises(RuntimeError, match="d_state = 65"):
        wide.use_kernels("kernel")
    ids = random_ids(SMALL, 1, 3, seed=0, device=DEVICE)
    deep = copy.deepcopy(model)
    assert torch.equal(deep(ids).logits, model(ids).logits)


@pytest.mark.gpu
def test_gpu_repeated_graph_captures_do_not_grow_memory():
    """Every GraphedStep warms up on the same side stream: capturing (and dropping) graphs again
    and again, as repeated generate() calls do, leaves allocated memory flat (a new stream each
    time would keep a new 32 MiB cuBLAS workspace each time)."""
    import gc

    model = _gpu_model(SMALL, torch.float16, seed=5)
    ids = random_ids(SMALL, 2, 8, seed=5, device=DEVICE)
    state = model(ids[:, :4]).state
    allocated = []
    for _ in range(6):
        graphed = GraphedStep(model.step_unchecked, ids[:, 4], state)
        graphed(ids[:, 4])
        del graphed
        gc.collect()
        torch.cuda.synchronize()
        allocated.append(torch.cuda.memory_allocated())
    assert allocated[-1] - allocated[1] < 8 * 2**20, allocated

"""Mode relations with the CUDA kernels (marked gpu; run by tools/gpu_check.sh)."""

from __future__ import annotations

import pytest
import torch

from quamba_layers.config import MambaConfig
from quamba_layers.model import MambaLM
from quamba_layers.quant import CalibrationSet, kernels_status, quantize, select_backend
from quamba_modes import resolve_mode
from quamba_modes.probes import StageProbe

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def setup():
    usable, reason = kernels_status()
    if not usable:
        pytest.skip(reason)
    model = MambaLM(MambaConfig(d_model=768, n_layer=4, vocab_size=50277), seed=0).eval()
    g = torch.Generator().manual_seed(0)
    calib = CalibrationSet(torch.randint(0, 50277, (4, 64), generator=g))
    qmodel = quantize(model, calib, progress=False, device="cuda").to("cuda")
    tokens = torch.randint(0, 50277, (4, 300), generator=torch.Generator().manual_seed(1)).cuda()
    return qmodel, tokens, select_backend("cuda", "kernel")


def run(qmodel, backend, mode, tokens, **overrides):
    resolved = resolve_mode(
        mode, device="cuda", kernels_available=True,
        backend_implementations=backend.implementations(), **overrides,
    )  # fmt: skip
    qmodel.set_datapath(resolved.datapath, backend)
    with StageProbe(qmodel, stages=["ssm_out", "ssm_impl"]) as probe:
        logits = qmodel(tokens).logits
    return logits, probe.records, resolved


def test_simulation_modes_run_the_kernel_and_match_the_reference_bit_for_bit(setup):
    """Logits and the prefill's states (the decode's starting point): 2-1 .. 2-4 (INT8 gate
    codes) run the exact INT8 scan kernel, mode 3 (float gate) the float32 simulation scan."""
    qmodel, tokens, backend = setup
    for mode in ("2-1", "2-2", "2-3", "2-4", "3"):
        fast, records, resolved = run(qmodel, backend, mode, tokens)
        assert resolved.datapath.ssm_impl == "sim_kernel"
        assert records[0]["ssm_impl"].startswith("ssm_sim: kernel")
        _, fast_state = qmodel.prefill(tokens)
        slow, _, _ = run(qmodel, backend, mode, tokens, ssm_impl="reference")
        _, slow_state = qmodel.prefill(tokens)
        assert torch.equal(fast, slow), mode
        for layer, (a, b) in enumerate(zip(fast_state, slow_state)):
            assert all(torch.equal(x, y) for x, y in zip(a, b)), (mode, layer)


def test_0_and_2_0_identical_and_2_2_and_2_1_identical_on_gpu(setup):
    qmodel, tokens, backend = setup
    assert torch.equal(run(qmodel, backend, "0", tokens)[0], run(qmodel, backend, "2-0", tokens)[0])
    assert torch.equal(
        run(qmodel, backend, "2-2", tokens)[0], run(qmodel, backend, "2-1", tokens)[0]
    )


def test_2_1_vs_0_ssm_outputs_within_tolerance_and_report_differing_fraction(setup, capsys):
    """Mode 0 runs the fast INT8 kernel, 2-1 the bit-exact simulation scan: same inputs in
    layer 0, so their FP16 SSM outputs differ only in the last bits."""
    qmodel, tokens, backend = setup
    _, r0, _ = run(qmodel, backend, "0", tokens)
    _, r21, _ = run(qmodel, backend, "2-1", tokens)
    y0, y21 = r0[0]["ssm_out"].float(), r21[0]["ssm_out"].float()
    rel = ((y0 - y21).norm() / y21.norm()).item()
    fractions = []
    for layer in sorted(r0):
        a, b = r0[layer]["ssm_out"], r21[layer]["ssm_out"]
        fractions.append((a != b).float().mean().item())
    with capsys.disabled():
        print(f"\n2-1 vs 0: layer-0 SSM relative error {rel:.2e}; fraction of differing FP16 "
              f"SSM outputs per layer {[f'{f:.4f}' for f in fractions]}")  # fmt: skip
    assert rel < 1e-3
    assert fractions[0] < 0.2


def test_kernel_backend_tracks_reference_backend(setup):
    """INT8 GEMMs, conv, norm, Hadamard and the simulation scan are bit-exact: every layer's
    out_proj output is identical; the FP16 lm_head (cuBLAS, float32 accumulation in another
    order than the reference's float32 matmul) leaves float32 rounding differences only."""
    qmodel, tokens, backend = setup
    resolved = resolve_mode("2-4", device="cuda", kernels_available=True,
                            backend_implementations=backend.implementations())  # fmt: skip
    qmodel.set_datapath(resolved.datapath, backend)
    with StageProbe(qmodel, stages=["out_proj_out", "conv_in"]) as probe:
        kernel = qmodel(tokens).logits
    kernel_records = probe.records
    reference = select_backend("cuda", "reference")
    qmodel.set_datapath(resolve_mode("2-4", ssm_impl="reference").datapath, reference)
    with StageProbe(qmodel, stages=["out_proj_out", "conv_in"]) as probe:
        ref = qmodel(tokens).logits
    assert kernel_records.keys() == probe.records.keys()
    for layer, got in kernel_records.items():
        for stage in ("conv_in", "out_proj_out"):
            assert torch.equal(got[stage], probe.records[layer][stage]), (layer, stage)
    scale = ref.abs().max()
    assert float((kernel - ref).abs().max()) <= 1e-5 * float(scale)
    assert not torch.equal(kernel, torch.zeros_like(kernel))


@pytest.mark.parametrize("batch", [1, 3])
def test_graph_decode_equals_eager_decode_bit_for_bit(setup, batch):
    """Mode 0 decode on the kernels: the CUDA-graph replay gives the eager step's bits, and
    generate() with and without the graph gives the same tokens."""
    qmodel, tokens, backend = setup
    from quamba_layers.cuda_graph import GraphedStep

    resolved = resolve_mode("0", device="cuda", kernels_available=True,
                            backend_implementations=backend.implementations())  # fmt: skip
    qmodel.set_datapath(resolved.datapath, backend)
    assert qmodel.graph_decoding_supported() == (True, "")
    prompt = tokens[:batch, :37]
    _, state = qmodel.prefill(prompt)
    eager_state = [tuple(t.clone() for t in layer) for layer in state]
    first = prompt[:, -1]
    graphed = GraphedStep(qmodel.step, first, state)
    nxt = first
    for _ in range(6):
        eager_logits, eager_state = qmodel.step(nxt, eager_state)
        graph_logits = graphed(nxt)
        assert torch.equal(graph_logits, eager_logits)
        nxt = eager_logits[:, :50277].argmax(-1)
    for (ge, gs), (ee, es) in zip(graphed.state, eager_state):
        assert torch.equal(ge, ee) and torch.equal(gs, es)
    with_graph = qmodel.generate(prompt, 12, cuda_graph=True)
    without = qmodel.generate(prompt, 12, cuda_graph=False)
    assert torch.equal(with_graph, without)


def test_kernel_decode_follows_reference_decode(setup):
    """Decode on the kernels vs the PyTorch reference ops: conv update and INT8 GEMMs are exact,
    the INT8 scan step is the kernel's (tolerance in quamba_kernels.scan_step); the logits of 8
    steps stay within a small relative distance."""
    qmodel, tokens, backend = setup
    prompt = tokens[:2, :50]
    outs = []
    for chosen in (backend, select_backend("cuda", "reference")):
        qmodel.set_datapath(resolve_mode("0", ssm_impl="reference").datapath, chosen)
        _, state = qmodel.prefill(prompt)
        logits_seq = []
        for step in range(8):
            logits, state = qmodel.step(tokens[:2, 50 + step], state)
            logits_seq.append(logits.clone())
        outs.append(torch.stack(logits_seq))
    got, want = outs
    assert float((got - want).norm() / want.norm()) < 1e-3


def test_graph_decoding_refuses_modes_with_reference_conversions(setup):
    qmodel, _, backend = setup
    resolved = resolve_mode("2-4", device="cuda", kernels_available=True,
                            backend_implementations=backend.implementations())  # fmt: skip
    qmodel.set_datapath(resolved.datapath, backend)
    supported, reason = qmodel.graph_decoding_supported()
    assert not supported and "INT8 conv output" in reason
    with pytest.raises(ValueError, match="cannot be captured"):
        qmodel.generate(torch.zeros(1, 4, dtype=torch.long, device="cuda"), 2, cuda_graph=True)


def test_kernel_quantize_matches_reference_and_defers_the_nan_check(setup):
    """The kernel backend's requantization: the reference codes, and a NaN raises at the end of
    the forward pass (check_deferred) instead of synchronising at every call."""
    from quamba_layers import reference_ops as ops

    _, _, backend = setup
    g = torch.Generator().manual_seed(5)
    v = (torch.randn(3, 77, 129, generator=g) * 4).cuda()
    for rule in ("half_away", "half_even"):
        assert torch.equal(backend.quantize_int8(v, 0.03, rule), ops.quantize_int8(v, 0.03, rule))
    backend.check_deferred()  # no NaN so far
    v[1, 2, 3] = float("nan")
    backend.quantize_int8(v, 0.03, "half_away")
    with pytest.raises(ValueError, match="NaN"):
        backend.check_deferred()
    backend.check_deferred()  # the flag is cleared once reported


@pytest.mark.parametrize("mode", ["0", "2-4"])
def test_programmatic_launch_changes_no_bits(setup, mode):
    """Forward logits and CUDA-graph decode (logits and state) with programmatic dependent launch
    on equal those with it off, bit for bit."""
    from quamba_kernels import programmatic_launch_enabled, set_programmatic_launch

    qmodel, tokens, backend = setup
    resolved = resolve_mode(mode, device="cuda", kernels_available=True,
                            backend_implementations=backend.implementations())  # fmt: skip
    qmodel.set_datapath(resolved.datapath, backend)
    before = programmatic_launch_enabled()
    results = []
    try:
        for enabled in (True, False):
            set_programmatic_launch(enabled)
            logits = qmodel(tokens[:2, :100]).logits
            generated = qmodel.generate(tokens[:2, :40], 10) if mode == "0" else None
            results.append((logits, generated))
    finally:
        set_programmatic_launch(before)
    (on_logits, on_tokens), (off_logits, off_tokens) = results
    assert torch.equal(on_logits, off_logits)
    if mode == "0":
        assert torch.equal(on_tokens, off_tokens)

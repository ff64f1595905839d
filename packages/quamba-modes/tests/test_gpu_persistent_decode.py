"""The persistent W8A8 decode kernel against the per-op decode step (marked gpu; run by
tools/gpu_check.sh): the same logits and states, bit for bit, token after token."""

from __future__ import annotations

import pytest
import torch

from quamba_layers.config import MambaConfig
from quamba_layers.model import MambaLM
from quamba_layers.quant import CalibrationSet, kernels_status, quantize, select_backend
from quamba_modes import resolve_mode

pytestmark = pytest.mark.gpu

VOCAB = 1000


def mode0_model(d_model: int, n_layer: int, seed: int):
    usable, reason = kernels_status()
    if not usable:
        pytest.skip(reason)
    model = MambaLM(MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=VOCAB), seed=seed)
    g = torch.Generator().manual_seed(seed)
    calib = CalibrationSet(torch.randint(0, VOCAB, (4, 64), generator=g))
    qmodel = quantize(model.eval(), calib, progress=False, device="cuda").to("cuda")
    backend = select_backend("cuda", "kernel")
    resolved = resolve_mode("0", device="cuda", kernels_available=True,
                            backend_implementations=backend.implementations())  # fmt: skip
    qmodel.set_datapath(resolved.datapath, backend)
    supported, reason = qmodel.persistent_decode_supported(1)
    if not supported:
        pytest.skip(reason)
    return qmodel


def clone(state):
    return [tuple(t.clone() for t in layer) for layer in state]


# d_model 256: E = 512 (a power of two), dt_rank 16; 768: E = 1536 = 12 * 128 (130m's shapes);
# 1280: E = 2560 = 20 * 128 (2.8B's Hadamard base), dt_rank 80.
@pytest.mark.parametrize(("d_model", "n_layer"), [(256, 3), (768, 2), (1280, 2)])
def test_persistent_decode_equals_per_op_decode_bit_for_bit(d_model, n_layer):
    qmodel = mode0_model(d_model, n_layer, seed=d_model)
    prompt = torch.randint(0, VOCAB, (1, 29), generator=torch.Generator().manual_seed(3)).cuda()
    _, state = qmodel.prefill(prompt)
    per_op_state, kernel_state = clone(state), clone(state)
    nxt = prompt[:, -1]
    for step in range(40):  # many launches: the exchange tags advance with every one
        qmodel.decode_kernel = "per_op"
        per_op_logits, per_op_state = qmodel.step(nxt, per_op_state)
        qmodel.decode_kernel = "auto"
        kernel_logits, kernel_state = qmodel.step(nxt, kernel_state)
        assert hasattr(kernel_state[0][0], "_quamba_decode_kernel")  # the kernel ran
        assert torch.equal(kernel_logits, per_op_logits), f"logits differ at step {step}"
        for layer, (a, b) in enumerate(zip(kernel_state, per_op_state)):
            assert torch.equal(a[0], b[0]), f"conv state of layer {layer} differs at step {step}"
            assert torch.equal(a[1], b[1]), f"SSM state of layer {layer} differs at step {step}"
        nxt = per_op_logits[:, :VOCAB].argmax(-1)


def test_persistent_decode_in_a_cuda_graph_generates_the_per_op_tokens():
    qmodel = mode0_model(768, 2, seed=5)
    prompt = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(4)).cuda()
    qmodel.decode_kernel = "per_op"
    per_op = qmodel.generate(prompt, 24, cuda_graph=True)
    qmodel.decode_kernel = "auto"
    graphed = qmodel.generate(prompt, 24, cuda_graph=True)
    eager = qmodel.generate(prompt, 24, cuda_graph=False)
    assert torch.equal(graphed, per_op) and torch.equal(eager, per_op)


def test_persistent_decode_is_the_default_follows_changed_scales_and_refuses_batches():
    qmodel = mode0_model(256, 2, seed=7)
    prompt = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(5)).cuda()
    assert qmodel.decode_implementation(1) == "persistent"  # the default
    assert qmodel.decode_implementation(2) == "per_op"
    assert qmodel.persistent_decode_supported(2) == (
        False, "the persistent decode kernel takes batch 1, got 2"
    )  # fmt: skip
    _, state = qmodel.prefill(prompt[:1])
    nxt = prompt[:1, -1]
    qmodel.step(nxt, clone(state))
    kernel = (
        state[0][0]._quamba_decode_kernel if hasattr(state[0][0], "_quamba_decode_kernel") else None
    )
    assert kernel is None  # built on the clone's tensors, not on these
    kernel_state = clone(state)
    qmodel.step(nxt, kernel_state)
    first = kernel_state[0][0]._quamba_decode_kernel
    mixer = qmodel.mixers[1]
    mixer.s_u.mul_(1.25)
    mixer.invalidate_scales()
    per_op_state = clone(kernel_state)
    logits, _ = qmodel.step(nxt, kernel_state)
    assert kernel_state[0][0]._quamba_decode_kernel is not first  # rebuilt for the new scale
    qmodel.decode_kernel = "per_op"
    expected, _ = qmodel.step(nxt, per_op_state)
    assert torch.equal(logits, expected)


def test_persistent_decode_follows_changed_options_and_timing_keeps_the_bits():
    qmodel = mode0_model(1280, 2, seed=11)
    from quamba_kernels.decode import PHASES

    prompt = torch.randint(0, VOCAB, (1, 23), generator=torch.Generator().manual_seed(6)).cuda()
    _, state = qmodel.prefill(prompt)
    nxt = prompt[:, -1]
    qmodel.decode_kernel = "auto"
    plain_state, timed_state = clone(state), clone(state)
    plain_logits, _ = qmodel.step(nxt, plain_state)
    plain = plain_state[0][0]._quamba_decode_kernel
    with pytest.raises(ValueError, match="timing=True"):
        plain.phase_cycles()
    qmodel.decode_kernel_options = {"inflight": 2, "timing": True}
    qmodel.step(nxt, plain_state)
    rebuilt = plain_state[0][0]._quamba_decode_kernel
    assert rebuilt is not plain  # the options changed: a new kernel
    cycles = rebuilt.phase_cycles()
    assert cycles.shape[1] == len(PHASES)
    assert bool((cycles > 0).all())  # every block timed every phase
    timed_logits, _ = qmodel.step(nxt, timed_state)
    assert torch.equal(timed_logits, plain_logits)  # the instrumentation changes no bits


def test_persistent_decode_states_share_x_slabs_and_follow_an_in_place_weight_change():
    qmodel = mode0_model(768, 2, seed=13)
    prompt = torch.randint(0, VOCAB, (1, 19), generator=torch.Generator().manual_seed(7)).cuda()
    _, state = qmodel.prefill(prompt)
    nxt = prompt[:, -1]
    first_state, second_state = clone(state), clone(state)
    qmodel.step(nxt, first_state)
    qmodel.step(nxt, second_state)
    first = first_state[0][0]._quamba_decode_kernel
    second = second_state[0][0]._quamba_decode_kernel
    assert first is not second  # one kernel object per decode state ...
    assert all(a is b for a, b in zip(first.x_slabs, second.x_slabs))  # ... one slab per model
    # An in-place write to x_proj's weight (the kernel's only copied weight): rebuilt slabs,
    # the same bits as the per-op step on the changed weight.
    weight = qmodel.mixers[1].x_proj_weight
    weight[:, ::3] = weight[:, ::3].flip(0)
    per_op_state, kernel_state = clone(state), clone(state)
    logits, kernel_state = qmodel.step(nxt, kernel_state)
    rebuilt = kernel_state[0][0]._quamba_decode_kernel
    assert rebuilt.x_slabs[0] is first.x_slabs[0] and rebuilt.x_slabs[1] is not first.x_slabs[1]
    qmodel.decode_kernel = "per_op"
    expected, per_op_state = qmodel.step(nxt, per_op_state)
    assert torch.equal(logits, expected)
    for a, b in zip(kernel_state, per_op_state):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])

"""resolve_mode: overrides, device/kernel availability, provenance."""

from __future__ import annotations

import json

import pytest

from quamba_layers.datapath import Datapath
from quamba_modes.registry import ModeError, get_mode
from quamba_modes.resolve import ResolvedMode, resolve_mode

QUANTIZED = ("0", "2-0", "2-1", "2-2", "2-3", "2-4", "3")
FLOATS = ("fp16", "fp32")
# Declared SSM implementation per mode (modes.md), and what `--ssm-impl kernel` gives with usable
# kernels: the INT8 kernel where declared, else the GPU simulation of the reference scan.
DECLARED_SSM = {
    "0": "kernel_int8",
    "2-0": "kernel_int8",
    "2-1": "reference",
    "2-2": "reference",
    "2-3": "reference",
    "2-4": "reference",
    "3": "reference",
}
KERNEL_OVERRIDE = {
    "0": "kernel_int8",
    "2-0": "kernel_int8",
    "2-1": "sim_kernel",
    "2-2": "sim_kernel",
    "2-3": "sim_kernel",
    "2-4": "sim_kernel",
    "3": "sim_kernel",
}
GPU = {"device": "cuda", "kernels_available": True}


def _without(data: dict, *keys: str) -> dict:
    return {key: value for key, value in data.items() if key not in keys}


OPS = {"rmsnorm", "gemm", "conv1d", "ssm", "hadamard"}


@pytest.mark.parametrize("name", QUANTIZED)
def test_gpu_with_kernels_runs_the_declared_datapath(name):
    resolved = resolve_mode(name, **GPU)
    assert isinstance(resolved, ResolvedMode)
    declared = get_mode(name).datapath
    assert resolved.notes == ()
    assert set(resolved.implementations) == OPS
    ssm = resolved.implementations["ssm"]
    if DECLARED_SSM[name] == "kernel_int8":
        assert resolved.datapath == declared
        assert ssm == "kernel (quamba_kernels): kernel_int8, INT8 selective scan"
    else:  # the reference scan runs as the GPU scan that is bit-identical to it
        assert resolved.datapath == declared.with_ssm_impl("sim_kernel")
        assert ssm == (
            "kernel (quamba_kernels): sim_kernel, scan bit-identical to the sequential reference"
        )
    assert resolved.implementations["conv1d"] == "kernel (quamba_kernels)"


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:1", "mps"])
@pytest.mark.parametrize("name", QUANTIZED)
def test_without_usable_kernels_the_reference_runs_and_is_recorded(name, device):
    resolved = resolve_mode(name, device=device, kernels_available=device == "mps")
    # The semantics stay the mode's; only the implementation changes, and that is said.
    assert resolved.datapath == get_mode(name).datapath
    assert resolved.implementations["ssm"].startswith("reference (PyTorch): ")
    assert resolved.implementations["conv1d"] == "reference (PyTorch)"
    if DECLARED_SSM[name] == "reference":
        assert resolved.notes == ()
    else:
        (note,) = resolved.notes
        assert "kernel_int8" in note and "PyTorch reference" in note and repr(device) in note
        assert note in resolved.describe()
        assert resolved.to_dict()["notes"] == [note]


def test_missing_kernels_reason_is_recorded():
    resolved = resolve_mode("0", device="cuda", kernels_reason="no compiled CUDA module")
    assert "no compiled CUDA module" in resolved.notes[0]


# What quamba_layers' backends report (their `implementations()`): the kernel backend may run
# some ops (e.g. the GEMMs) on their reference.
KERNEL_BACKEND = {
    "rmsnorm": "kernel (quamba_kernels)",
    "gemm": "reference (PyTorch, no kernel yet)",
    "conv1d": "kernel (quamba_kernels)",
    "ssm_int8": "kernel (quamba_kernels)",
    "ssm_sim": "kernel (quamba_kernels)",
    "hadamard": "kernel (quamba_kernels)",
}
REFERENCE_BACKEND = dict.fromkeys(KERNEL_BACKEND, "reference (PyTorch)")


def test_backend_implementations_are_recorded_verbatim():
    resolved = resolve_mode("2-0", backend_implementations=KERNEL_BACKEND, **GPU)
    assert resolved.implementations["gemm"] == "reference (PyTorch, no kernel yet)"
    assert resolved.implementations["ssm"].startswith("kernel (quamba_kernels): kernel_int8")
    assert resolved.notes == ()
    resolved = resolve_mode("2-4", ssm_impl="kernel", backend_implementations=KERNEL_BACKEND, **GPU)
    assert resolved.implementations["ssm"].startswith("kernel (quamba_kernels): sim_kernel")


def test_reference_backend_on_gpu_is_noted_and_refuses_kernel_requests():
    resolved = resolve_mode("0", backend_implementations=REFERENCE_BACKEND, **GPU)
    assert resolved.datapath.ssm_impl == "kernel_int8"
    assert resolved.implementations["ssm"].startswith("reference (PyTorch): kernel_int8")
    assert "selected backend runs the reference" in resolved.notes[0]
    with pytest.raises(ModeError, match="kernel implementation requested but the selected backend"):
        resolve_mode("2-1", ssm_impl="kernel", backend_implementations=REFERENCE_BACKEND, **GPU)


@pytest.mark.parametrize(
    ("given", "error", "match"),
    [
        ({"gemm": "reference (PyTorch)"}, ModeError, "lacks a text"),
        ({**KERNEL_BACKEND, "ssm_sim": None}, ModeError, "ssm_sim"),
        (["kernel"], TypeError, "mapping"),
    ],
)
def test_malformed_backend_implementations_are_rejected(given, error, match):
    with pytest.raises(error, match=match):
        resolve_mode("0", backend_implementations=given, **GPU)


@pytest.mark.parametrize("rule", ["half_away", "half_even"])
@pytest.mark.parametrize("name", QUANTIZED)
def test_rounding_override_changes_every_site_and_nothing_else(name, rule):
    resolved = resolve_mode(name, rounding=rule, **GPU)
    declared = get_mode(name).datapath.to_dict()
    final = resolved.datapath.to_dict()
    if declared["ssm_impl"] == "reference":  # on the GPU: the bit-identical simulation kernel
        declared["ssm_impl"] = "sim_kernel"
    assert _without(final, "rounding") == _without(declared, "rounding")
    assert set(final["rounding"]) == set(declared["rounding"])
    assert set(final["rounding"].values()) == {rule}
    assert resolved.rounding_override == rule
    assert resolved.to_dict()["overrides"] == {"rounding": rule, "ssm_impl": None}


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("name", QUANTIZED)
def test_ssm_impl_reference_forces_the_reference_without_a_note(name, device):
    resolved = resolve_mode(name, ssm_impl="reference", device=device, kernels_available=True)
    declared = get_mode(name).datapath.to_dict()
    assert resolved.datapath.ssm_impl == "reference"
    assert _without(resolved.datapath.to_dict(), "ssm_impl") == _without(declared, "ssm_impl")
    assert resolved.notes == ()  # asked for: not a fallback


@pytest.mark.parametrize("name", QUANTIZED)
def test_ssm_impl_kernel_maps_to_the_gpu_implementation(name):
    resolved = resolve_mode(name, ssm_impl="kernel", device="cuda:0", kernels_available=True)
    assert resolved.datapath.ssm_impl == KERNEL_OVERRIDE[name]
    declared = get_mode(name).datapath.to_dict()
    assert _without(resolved.datapath.to_dict(), "ssm_impl") == _without(declared, "ssm_impl")
    assert resolved.implementations["ssm"].startswith(
        f"kernel (quamba_kernels): {KERNEL_OVERRIDE[name]}"
    )


@pytest.mark.parametrize(
    ("device", "available", "reason", "words"),
    [
        ("cpu", False, "", ["'cpu'", "CUDA devices only"]),
        ("cpu", True, "", ["'cpu'"]),
        ("cuda", False, "built with QUAMBA_KERNELS_BUILD=0", ["QUAMBA_KERNELS_BUILD=0"]),
        ("cuda", False, "", ["not available"]),
    ],
)
@pytest.mark.parametrize("name", ["0", "2-4"])
def test_kernel_requested_without_kernels_fails(name, device, available, reason, words):
    with pytest.raises(ModeError) as info:
        resolve_mode(
            name,
            ssm_impl="kernel",
            device=device,
            kernels_available=available,
            kernels_reason=reason,
        )
    message = str(info.value)
    assert message.startswith("kernel implementation requested but")
    assert "--ssm-impl reference" in message
    for word in words:
        assert word in message


@pytest.mark.parametrize("name", FLOATS)
def test_float_modes_resolve_without_datapath(name):
    resolved = resolve_mode(name)
    assert resolved.datapath is None
    assert list(resolved.implementations) == ["model"]
    assert get_mode(name).float_dtype in resolved.implementations["model"]
    data = json.loads(json.dumps(resolved.to_dict()))
    assert data["datapath"] is None and data["float_dtype"] == get_mode(name).float_dtype


@pytest.mark.parametrize(
    "overrides", [{"rounding": "half_away"}, {"ssm_impl": "reference"}, {"ssm_impl": "kernel"}]
)
@pytest.mark.parametrize("name", FLOATS)
def test_overrides_on_float_modes_are_rejected(name, overrides):
    with pytest.raises(ModeError, match="quantized modes only"):
        resolve_mode(name, device="cuda", kernels_available=True, **overrides)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"rounding": "nearest"}, ModeError, "half_away, half_even"),
        ({"rounding": "HALF_EVEN"}, ModeError, "rounding override"),
        ({"ssm_impl": "kernel_int8"}, ModeError, "reference, kernel"),
        ({"ssm_impl": "cuda"}, ModeError, "ssm_impl override"),
        ({"device": ""}, ModeError, "device"),
        ({"device": None}, ModeError, "device"),
        ({"device": "cuda 0"}, ModeError, "device"),
        ({"kernels_available": "yes"}, TypeError, "kernels_available"),
    ],
)
def test_invalid_arguments_are_rejected_up_front(kwargs, error, match):
    with pytest.raises(error, match=match):
        resolve_mode("2-1", **kwargs)


def test_removed_and_unknown_names_fail_in_resolve():
    with pytest.raises(ModeError, match="fp32"):
        resolve_mode("1")
    with pytest.raises(ModeError, match="unknown mode"):
        resolve_mode("2-9")


def test_device_objects_are_accepted_by_name():
    class FakeDevice:  # e.g. torch.device("cuda", 0), whose str() is "cuda:0"
        def __str__(self) -> str:
            return "cuda:0"

    resolved = resolve_mode("0", device=FakeDevice(), kernels_available=True)
    assert resolved.device == "cuda:0"
    assert resolved.datapath.ssm_impl == "kernel_int8"


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("0", {}),
        ("2-3", {"rounding": "half_away", "device": "cuda", "kernels_available": True}),
        ("3", {"ssm_impl": "kernel", "device": "cuda", "kernels_available": True}),
        ("2-0", {"ssm_impl": "reference", "rounding": "half_even"}),
    ],
)
def test_to_dict_is_json_safe_and_records_everything(name, kwargs):
    resolved = resolve_mode(name, **kwargs)
    text = json.dumps(resolved.to_dict(), sort_keys=True)
    data = json.loads(text)
    assert Datapath.from_dict(data["datapath"]) == resolved.datapath
    assert Datapath.from_dict(data["declared_datapath"]) == get_mode(name).datapath
    assert data["name"] == name and data["kind"] == "quantized"
    assert data["overrides"] == {
        "rounding": kwargs.get("rounding"),
        "ssm_impl": kwargs.get("ssm_impl"),
    }
    assert data["device"] == kwargs.get("device", "cpu")
    assert data["x_proj_input"] == resolved.datapath.x_proj_input
    assert set(data["implementations"]) == OPS
    # Deterministic: the same resolution serializes to the same text.
    assert json.dumps(resolve_mode(name, **kwargs).to_dict(), sort_keys=True) == text


def test_describe_shows_every_stage_and_override():
    resolved = resolve_mode("2-4", rounding="half_away", ssm_impl="reference")
    text = resolved.describe()
    assert text.startswith("mode 2-4:")
    for fragment in [
        "conv output         fp32",
        "x_proj input        Q8(v, s_u)",
        "SSM input u         fp32",
        "SSM implementation  reference",
        "requant=half_away",
        "rounding=half_away, ssm_impl=reference",
        "device              cpu",
    ]:
        assert fragment in text
    assert "model: unquantized float16" in resolve_mode("fp16").describe()


def test_resolved_mode_is_frozen_and_comparable():
    first = resolve_mode("2-2", rounding="half_away")
    second = resolve_mode("2-2", rounding="half_away")
    assert first == second
    assert first != resolve_mode("2-2")
    with pytest.raises(AttributeError):
        first.device = "cuda"
    with pytest.raises(TypeError):
        first.implementations["ssm"] = "anything"


def test_the_layers_reference_backend_report_is_accepted():
    backends = pytest.importorskip("quamba_layers.quant.backends")
    report = backends.reference_backend().implementations()
    resolved = resolve_mode("0", backend_implementations=report)
    assert (
        resolved.implementations["ssm"] == f"{report['ssm_int8']}: kernel_int8, INT8 selective scan"
    )
    assert resolved.notes  # the INT8 kernel's reference runs, and that is said

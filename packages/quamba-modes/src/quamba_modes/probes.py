"""Stage probes: record what each stage of a quantized Mamba block produced, per layer.

Stages (in order): ``norm_out`` (INT8 in_proj input), ``conv_in``, ``conv_out``, ``x_proj_in``,
``ssm_in``, ``ssm_impl`` (a string naming the implementation that ran), ``ssm_out`` (float16, after
the gate), ``out_proj_in`` (INT8), ``out_proj_out`` (float16, rotated residual basis).

    with StageProbe(model, layers=[0]) as probe:
        model(tokens)
    probe.records[0]["conv_out"]

``on_record`` receives ``(layer, stage, value)`` instead of keeping tensors (for streaming metrics).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

STAGES = (
    "norm_out",
    "conv_in",
    "conv_out",
    "x_proj_in",
    "ssm_in",
    "ssm_impl",
    "ssm_out",
    "out_proj_in",
    "out_proj_out",
)


class StageProbe:
    def __init__(
        self,
        model,
        layers: Iterable[int] | None = None,
        stages: Iterable[str] | None = None,
        on_record: Callable[[int, str, object], None] | None = None,
    ) -> None:
        mixers = model.mixers
        self.model = model
        self.layers = list(range(len(mixers))) if layers is None else list(layers)
        for index in self.layers:
            if not 0 <= index < len(mixers):
                raise ValueError(f"layer {index} out of range: the model has {len(mixers)} layers")
        self.stages = set(STAGES if stages is None else stages)
        unknown = self.stages - set(STAGES)
        if unknown:
            raise ValueError(f"unknown stages {sorted(unknown)}; stages are {', '.join(STAGES)}")
        self.on_record = on_record
        self.records: dict[int, dict[str, object]] = {i: {} for i in self.layers}
        self._saved: list = []

    def _recorder(self, layer: int):
        def record(stage: str, value) -> None:
            if stage not in self.stages:
                return
            if isinstance(value, torch.Tensor):
                value = value.detach()
            if self.on_record is not None:
                self.on_record(layer, stage, value)
            else:
                self.records[layer][stage] = (
                    value.clone() if isinstance(value, torch.Tensor) else value
                )

        return record

    def __enter__(self) -> StageProbe:
        mixers = self.model.mixers
        for index in self.layers:
            self._saved.append((mixers[index], mixers[index].probe))
            mixers[index].probe = self._recorder(index)
        return self

    def __exit__(self, *exc) -> None:
        for mixer, previous in self._saved:
            mixer.probe = previous
        self._saved.clear()


def on_int8_grid(values: torch.Tensor, scale: float) -> bool:
    """True when every float32 value is ``q * scale`` for an INT8 code q (as dequantize makes it)."""
    s = torch.tensor(scale, dtype=torch.float32)
    codes = torch.clamp(torch.round(values.float() / s), -128, 127)
    return bool(torch.equal(codes * s, values.float()))

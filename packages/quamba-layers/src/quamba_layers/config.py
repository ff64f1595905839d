"""Configuration of the FP Mamba-1 language model, and the published model sizes."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

__all__ = ["PRESETS", "MambaConfig"]


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"MambaConfig.{name} must be a positive int, got {value!r}")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"MambaConfig.{name} must be a bool, got {value!r}")


@dataclass(frozen=True)
class MambaConfig:
    """Sizes and options of a Mamba-1 language model (the mamba_ssm `MambaConfig` subset we support).

    `vocab_size` is the tokenizer's size; the embedding and lm_head have `padded_vocab_size` rows
    (rounded up to a multiple of `pad_vocab_size_multiple`, as mamba_ssm does).
    """

    d_model: int
    n_layer: int
    vocab_size: int
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | str = "auto"
    rms_norm_eps: float = 1e-5
    pad_vocab_size_multiple: int = 8
    tie_embeddings: bool = True
    residual_in_fp32: bool = True
    conv_bias: bool = True
    bias: bool = False

    def __post_init__(self) -> None:
        for name in ("d_model", "n_layer", "vocab_size", "d_state", "d_conv", "expand"):
            _check_positive_int(name, getattr(self, name))
        _check_positive_int("pad_vocab_size_multiple", self.pad_vocab_size_multiple)
        if self.dt_rank != "auto":
            if isinstance(self.dt_rank, bool) or not isinstance(self.dt_rank, int):
                raise ValueError(
                    f"MambaConfig.dt_rank must be 'auto' or a positive int, got {self.dt_rank!r}"
                )
            _check_positive_int("dt_rank", self.dt_rank)
        eps = self.rms_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, int | float):
            raise ValueError(f"MambaConfig.rms_norm_eps must be a positive float, got {eps!r}")
        if not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"MambaConfig.rms_norm_eps must be a positive float, got {eps!r}")
        for name in ("tie_embeddings", "residual_in_fp32", "conv_bias", "bias"):
            _check_bool(name, getattr(self, name))

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and lm_head: vocab_size rounded up to pad_vocab_size_multiple."""
        multiple = self.pad_vocab_size_multiple
        return -(-self.vocab_size // multiple) * multiple

    @property
    def d_inner(self) -> int:
        """E, the width of the mixer's inner activations (expand * d_model)."""
        return self.expand * self.d_model

    @property
    def resolved_dt_rank(self) -> int:
        """R, the rank of the dt projection (ceil(d_model / 16) when dt_rank is 'auto')."""
        if self.dt_rank == "auto":
            return math.ceil(self.d_model / 16)
        return int(self.dt_rank)

    def to_dict(self) -> dict[str, Any]:
        """All fields as a JSON-serialisable dict (round-trips through `from_dict`)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MambaConfig:
        """Build a config from `to_dict()` output; unknown or missing keys are a ValueError."""
        if not isinstance(data, dict):
            raise TypeError(f"MambaConfig.from_dict expects a dict, got {type(data).__name__}")
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown MambaConfig keys {unknown}; accepted keys are {sorted(known)}"
            )
        required = {"d_model", "n_layer", "vocab_size"}
        missing = sorted(required - set(data))
        if missing:
            raise ValueError(f"MambaConfig is missing required keys {missing}")
        return cls(**data)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> MambaConfig:
        """The config of a published size ("130m" ... "2.8b"), with optional field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; available presets: {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)


# The state-spaces/mamba-* family: GPT-NeoX-20B tokenizer (50,277 ids, padded to 50,280).
_NEOX_VOCAB = 50277

PRESETS: dict[str, MambaConfig] = {
    "130m": MambaConfig(d_model=768, n_layer=24, vocab_size=_NEOX_VOCAB),
    "370m": MambaConfig(d_model=1024, n_layer=48, vocab_size=_NEOX_VOCAB),
    "790m": MambaConfig(d_model=1536, n_layer=48, vocab_size=_NEOX_VOCAB),
    "1.4b": MambaConfig(d_model=2048, n_layer=48, vocab_size=_NEOX_VOCAB),
    "2.8b": MambaConfig(d_model=2560, n_layer=64, vocab_size=_NEOX_VOCAB),
}

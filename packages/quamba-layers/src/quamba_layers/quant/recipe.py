"""Post-training quantization recipes (what calibration does), recorded in every checkpoint."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class QuantRecipe:
    """How a float model becomes W8A8.

    name: a label for reports.
    hadamard: rotate the residual stream (embedding, lm_head, in_proj) with a Hadamard matrix and put
        the online Hadamard before out_proj (Quamba); off = naive static quantization.
    percentile_alpha: percentile observer on the SSM input u and the SSM state (EMA of per-sample
        quantiles); None = min-max everywhere.
    momentum: EMA momentum of the percentile observer.
    num_samples, seq_len: calibration set size (samples x tokens), taken in file order.
    quantize_embedding, quantize_lm_head: upstream's head-to-toe options (off for Quamba1).
    """

    name: str = "quamba"
    hadamard: bool = True
    percentile_alpha: float | None = 0.9995
    momentum: float = 0.01
    num_samples: int = 512
    seq_len: int = 512
    quantize_embedding: bool = False
    quantize_lm_head: bool = False

    def __post_init__(self) -> None:
        if self.percentile_alpha is not None and not 0.0 < self.percentile_alpha <= 1.0:
            raise ValueError(
                f"percentile_alpha must be in (0, 1] or None, got {self.percentile_alpha}"
            )
        if not 0.0 < self.momentum <= 1.0:
            raise ValueError(f"momentum must be in (0, 1], got {self.momentum}")
        if self.num_samples < 1 or self.seq_len < 1:
            raise ValueError(
                f"num_samples and seq_len must be >= 1, got {self.num_samples} x {self.seq_len}"
            )

    def with_calibration(self, num_samples: int, seq_len: int) -> QuantRecipe:
        return replace(self, num_samples=num_samples, seq_len=seq_len)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> QuantRecipe:
        return cls(**data)


RECIPES = {
    # Upstream Quamba1 W8A8 (alpha 0.9995 as in upstream HEAD).
    "quamba": QuantRecipe(),
    # The paper's "static" baseline: min-max everywhere, no Hadamard.
    "naive": QuantRecipe(name="naive", hadamard=False, percentile_alpha=None),
}


def get_recipe(name: str) -> QuantRecipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; known recipes: {', '.join(RECIPES)}") from None

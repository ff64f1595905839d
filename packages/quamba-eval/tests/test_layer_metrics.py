"""Tests of quamba_eval.layer_metrics against numpy on the concatenated data."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from quamba_eval.layer_metrics import (
    ABS_DIFF_PERCENTILES,
    RATING_THRESHOLDS,
    StreamingErrorStats,
    rate,
)

BIN_FACTOR = 10.0 ** (1.0 / 64.0)  # width of one histogram bin (64 per decade)


def _random_batches(seed: int, kind: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of various shapes; `other` = ref plus an error of the requested kind."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for index in range(25):
        shape = (1 + index % 3, 7 + 5 * index, 4)
        ref = 3.0 + 2.0 * torch.randn(shape, generator=generator, dtype=torch.float64)
        if kind == "gaussian":
            other = ref + 1e-3 * torch.randn(shape, generator=generator, dtype=torch.float64)
        elif kind == "lognormal":  # |d| spread over many decades
            magnitude = torch.exp(
                3.0 * torch.randn(shape, generator=generator, dtype=torch.float64)
            )
            sign = torch.randint(0, 2, shape, generator=generator) * 2 - 1
            other = ref + 1e-4 * magnitude * sign
        else:  # "quantized": INT8-grid rounding, many exact zeros where ref is on the grid
            scale = 0.05
            ref = torch.where(
                torch.rand(shape, generator=generator) < 0.3, ref.div(scale).round() * scale, ref
            )
            other = ref.div(scale).round() * scale
        batches.append((ref.to(torch.float32), other.to(torch.float32)))
    return batches


def _numpy_metrics(batches) -> dict[str, float | np.ndarray]:
    ref = np.concatenate([r.double().numpy().ravel() for r, _ in batches])
    other = np.concatenate([o.double().numpy().ravel() for _, o in batches])
    diff = other - ref
    return {
        "ref": ref,
        "abs_diff": np.abs(diff),
        "mse": np.mean(diff**2),
        "mae": np.mean(np.abs(diff)),
        "relative_mse": np.mean(diff**2) / np.mean(ref**2),
        "relative_mae": np.mean(np.abs(diff)) / np.mean(np.abs(ref)),
        "pearson": np.corrcoef(ref, other)[0, 1],
        "sqnr_db": 10 * np.log10(np.sum(ref**2) / np.sum(diff**2)),
        "max_abs_diff": np.max(np.abs(diff)),
        "mean_diff": np.mean(diff),
        "std_diff": np.std(diff),
        "ref_std": np.std(ref),
        "other_mean": np.mean(other),
        "fraction_identical": np.mean(diff == 0),
        "count": ref.size,
    }


def _stream(batches) -> StreamingErrorStats:
    stats = StreamingErrorStats()
    for ref, other in batches:
        stats.update(ref, other)
    return stats


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("kind", ["gaussian", "lognormal", "quantized"])
def test_streaming_equals_numpy_on_concatenation(seed: int, kind: str) -> None:
    batches = _random_batches(seed, kind)
    result = _stream(batches).result()
    expected = _numpy_metrics(batches)
    assert result["count"] == expected["count"]
    assert result["nonfinite_count"] == 0
    for name in (
        "mse",
        "mae",
        "relative_mse",
        "relative_mae",
        "pearson",
        "sqnr_db",
        "mean_diff",
        "std_diff",
        "ref_std",
        "other_mean",
    ):
        assert result[name] == pytest.approx(expected[name], rel=1e-9), name
    # 1 - pearson is the informative part when the correlation is close to one.
    assert 1 - result["pearson"] == pytest.approx(1 - expected["pearson"], rel=1e-6)
    assert result["rmse"] == pytest.approx(math.sqrt(expected["mse"]), rel=1e-9)
    assert result["max_abs_diff"] == expected["max_abs_diff"]
    assert result["fraction_identical"] == expected["fraction_identical"]


@pytest.mark.parametrize("kind", ["gaussian", "lognormal", "quantized"])
def test_percentiles_within_one_bin(kind: str) -> None:
    batches = _random_batches(7, kind)
    result = _stream(batches).result()
    abs_diff = _numpy_metrics(batches)["abs_diff"]
    for q in ABS_DIFF_PERCENTILES:
        exact = np.percentile(abs_diff, q)
        estimate = result["abs_diff_percentiles"][f"p{q:g}"]
        if exact == 0.0:
            assert estimate == 0.0
        else:
            assert exact / BIN_FACTOR <= estimate <= exact * BIN_FACTOR, (q, exact, estimate)


def test_percentile_of_few_values() -> None:
    values = torch.tensor([0.0, 1e-3, 2e-3, 5.0], dtype=torch.float64)
    stats = StreamingErrorStats().update(torch.zeros(4, dtype=torch.float64) + 1.0, 1.0 + values)
    percentiles = stats.result()["abs_diff_percentiles"]
    # Float64 rounding of 1 + v changes v slightly; compare with the actual differences.
    actual = ((1.0 + values) - 1.0).numpy()
    for q in ABS_DIFF_PERCENTILES:
        exact = np.percentile(actual, q)
        assert exact / BIN_FACTOR <= percentiles[f"p{q:g}"] <= exact * BIN_FACTOR
    assert percentiles["p99.9"] <= stats.result()["max_abs_diff"]


@pytest.mark.parametrize("split", [1, 9, 24])
def test_merge_equals_single_pass(split: int) -> None:
    batches = _random_batches(3, "lognormal")
    single = _stream(batches)
    merged = _stream(batches[:split]).merge(_stream(batches[split:]))
    single_result, merged_result = single.result(), merged.result()
    np.testing.assert_array_equal(single.histogram, merged.histogram)
    assert merged_result["abs_diff_percentiles"] == single_result["abs_diff_percentiles"]
    for name, value in single_result.items():
        if name != "abs_diff_percentiles":
            assert merged_result[name] == pytest.approx(value, rel=1e-12), name


def test_merge_with_empty_accumulator() -> None:
    batches = _random_batches(4, "gaussian")
    stats = _stream(batches)
    before = stats.result()
    stats.merge(StreamingErrorStats())
    assert stats.result() == before
    assert StreamingErrorStats().merge(stats).result() == before


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_identical_tensors(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(5)
    ref = torch.randn(2, 64, 48, generator=generator).to(dtype)
    result = StreamingErrorStats().update(ref, ref.clone()).result()
    assert result["mse"] == 0.0
    assert result["mae"] == 0.0
    assert result["sqnr_db"] == math.inf
    assert result["fraction_identical"] == 1.0
    assert result["pearson"] == 1.0
    assert all(value == 0.0 for value in result["abs_diff_percentiles"].values())
    assert rate(result)["overall"] == "excellent"


def test_low_precision_inputs_are_compared_in_float64() -> None:
    generator = torch.Generator().manual_seed(6)
    ref = torch.randn(4, 300, generator=generator)
    other = ref.to(torch.bfloat16)
    result = StreamingErrorStats().update(ref, other).result()
    diff = other.double().numpy() - ref.double().numpy()
    assert result["mse"] == pytest.approx(np.mean(diff**2), rel=1e-12)
    assert result["mse"] > 0.0


def test_large_offset_pearson_is_stable() -> None:
    # Means of 1e6 with unit variance: naive sum-of-squares formulas lose all digits here.
    generator = torch.Generator().manual_seed(8)
    batches = []
    for _ in range(10):
        ref = 1e6 + torch.randn(1000, generator=generator, dtype=torch.float64)
        other = ref + 0.1 * torch.randn(1000, generator=generator, dtype=torch.float64)
        batches.append((ref, other))
    result = _stream(batches).result()
    expected = _numpy_metrics(batches)
    assert result["pearson"] == pytest.approx(expected["pearson"], rel=1e-9)
    assert result["ref_std"] == pytest.approx(expected["ref_std"], rel=1e-9)


def test_nonfinite_elements_are_counted_and_excluded() -> None:
    generator = torch.Generator().manual_seed(9)
    ref = torch.randn(500, generator=generator, dtype=torch.float64)
    other = ref + 1e-3 * torch.randn(500, generator=generator, dtype=torch.float64)
    other_with_nan = other.clone()
    other_with_nan[[3, 77]] = torch.tensor([math.nan, math.inf], dtype=torch.float64)
    stats = StreamingErrorStats().update(ref, other_with_nan)
    finite = torch.ones(500, dtype=torch.bool)
    finite[[3, 77]] = False
    clean = StreamingErrorStats().update(ref[finite], other[finite]).result()
    result = stats.result()
    assert result["nonfinite_count"] == 2
    assert result["count"] == 498
    assert result["mse"] == pytest.approx(clean["mse"], rel=1e-12)
    assert rate(result)["overall"] == "poor"


def test_to_dict_from_dict_round_trip() -> None:
    stats = _stream(_random_batches(10, "quantized"))
    state = json.loads(json.dumps(stats.to_dict()))
    restored = StreamingErrorStats.from_dict(state)
    assert restored.result() == stats.result()
    # A restored accumulator keeps accumulating like the original.
    extra = _random_batches(11, "gaussian")[:3]
    for ref, other in extra:
        stats.update(ref, other)
        restored.update(ref, other)
    assert restored.result() == stats.result()


@pytest.mark.gpu
def test_gpu_tensors_match_cpu() -> None:
    batches = _random_batches(12, "lognormal")
    gpu_stats = StreamingErrorStats()
    for ref, other in batches:
        gpu_stats.update(ref.cuda(), other.cuda())
    cpu_result = _stream(batches).result()
    gpu_result = gpu_stats.result()
    for name in ("mse", "mae", "pearson", "sqnr_db", "max_abs_diff"):
        assert gpu_result[name] == pytest.approx(cpu_result[name], rel=1e-9)
    np.testing.assert_array_equal(gpu_stats.histogram, _stream(batches).histogram)


# --------------------------------------------------------------------------------- ratings


@pytest.mark.parametrize(
    ("mse", "expected"),
    [
        (5e-5, "excellent"),
        (1e-4, "good"),
        (5e-4, "good"),
        (5e-3, "fair"),
        (1e-2, "poor"),
        (1.0, "poor"),
    ],
)
def test_rate_mse_bands(mse: float, expected: str) -> None:
    assert rate({"mse": mse, "pearson": 1.0, "relative_mae": 0.0})["mse"] == expected


@pytest.mark.parametrize(
    ("pearson", "expected"),
    [
        (0.99995, "excellent"),
        (0.9999, "good"),
        (0.9995, "good"),
        (0.995, "fair"),
        (0.97, "mediocre"),
        (0.95, "poor"),
        (0.5, "poor"),
    ],
)
def test_rate_pearson_bands(pearson: float, expected: str) -> None:
    assert rate({"mse": 0.0, "pearson": pearson, "relative_mae": 0.0})["pearson"] == expected


@pytest.mark.parametrize(
    ("relative_mae", "expected"),
    [(0.0005, "excellent"), (0.005, "good"), (0.03, "fair"), (0.07, "mediocre"), (0.2, "poor")],
)
def test_rate_relative_mae_bands(relative_mae: float, expected: str) -> None:
    ratings = rate({"mse": 0.0, "pearson": 1.0, "relative_mae": relative_mae})
    assert ratings["relative_mae"] == expected
    assert ratings["overall"] == expected  # the other two are excellent


def test_rate_overall_is_worst_and_nan_is_undefined() -> None:
    ratings = rate({"mse": 5e-4, "pearson": 0.97, "relative_mae": 0.0005})
    assert ratings == {
        "mse": "good",
        "pearson": "mediocre",
        "relative_mae": "excellent",
        "overall": "mediocre",
    }
    ratings = rate({"mse": 5e-3, "pearson": math.nan, "relative_mae": 0.0005})
    assert ratings["pearson"] == "undefined"
    assert ratings["overall"] == "fair"
    assert set(RATING_THRESHOLDS) == {"mse", "pearson", "relative_mae"}


def test_rate_on_real_result() -> None:
    result = _stream(_random_batches(2, "gaussian")).result()
    # Error 1e-3 on values of scale ~3: mse 1e-6, relative MAE ~ 2.5e-4, corr ~ 1 - 1e-7.
    assert rate(result)["overall"] == "excellent"


# --------------------------------------------------------------------------------- bad inputs


def test_bad_inputs_raise_clear_errors() -> None:
    stats = StreamingErrorStats()
    with pytest.raises(ValueError, match="same shape"):
        stats.update(torch.ones(3, 4), torch.ones(4, 3))
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        stats.update([1.0, 2.0], torch.ones(2))
    with pytest.raises(TypeError, match="real-valued"):
        stats.update(torch.ones(2, dtype=torch.complex64), torch.ones(2, dtype=torch.complex64))
    with pytest.raises(ValueError, match="no elements accumulated"):
        stats.result()
    with pytest.raises(TypeError, match="StreamingErrorStats"):
        stats.merge({"count": 1})
    state = _stream(_random_batches(1, "gaussian")[:2]).to_dict()
    with pytest.raises(ValueError, match="version"):
        StreamingErrorStats.from_dict({**state, "version": 99})
    with pytest.raises(ValueError, match="missing keys"):
        StreamingErrorStats.from_dict({key: v for key, v in state.items() if key != "m2_ref"})
    with pytest.raises(ValueError, match="histogram layout"):
        StreamingErrorStats.from_dict(
            {**state, "histogram": {**state["histogram"], "bins_per_decade": 32}}
        )
    with pytest.raises(ValueError, match="missing"):
        rate({"mse": 0.0, "pearson": 1.0})
    with pytest.raises(TypeError, match="must be a number"):
        rate({"mse": "0.1", "pearson": 1.0, "relative_mae": 0.0})

"""perplexity_on_text and fidelity against independent float64 / numpy computations."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from lm_eval.api.instance import Instance
from scipy.special import log_softmax as np_log_softmax

from quamba_eval.fidelity import fidelity
from quamba_eval.lm import QuambaLM
from quamba_eval.perplexity import perplexity_on_text
from quamba_eval.testing import EOS, ByteTokenizer, TinyCausalLM


def _perturbed(seed, n_changes=400):
    """Same model with some head weights moved by +-1 or +-2 (an exact perturbation)."""
    model = TinyCausalLM(seed=seed)
    rng = random.Random(seed)
    with torch.no_grad():
        for _ in range(n_changes):
            row, col = rng.randrange(model.head.shape[0]), rng.randrange(model.head.shape[1])
            model.head[row, col] += rng.choice((-2.0, -1.0, 1.0, 2.0))
    return model


def _text(seed, n_chars):
    rng = random.Random(seed)
    words = ["the", "river", "stone", "quietly", "ran", "over", "a", "hill", "and", "light"]
    out = []
    while sum(len(w) + 1 for w in out) < n_chars:
        out.append(rng.choice(words) + rng.choice(["", "", ",", "."]))
    return " ".join(out)[:n_chars]


def _log_probs64(model, tokens):
    """float64 log-softmax of one unpadded sequence's logits (L, V) as numpy."""
    with torch.no_grad():
        logits = model.double()(torch.tensor([tokens])).logits[0].numpy()
    return np_log_softmax(logits, axis=-1)


def _reference_nll(model, tokens, max_length, windowing):
    """Independent windowing: returns (total NLL, predicted token count)."""
    total, count = 0.0, 0
    if windowing == "rolling":
        padded = [EOS, *tokens]  # padded[i] is the token before tokens[i]
        for start in range(0, len(tokens), max_length):
            end = min(start + max_length, len(tokens))
            window = padded[max(0, end - max_length) : end]
            log_probs = _log_probs64(model, window)[-(end - start) :]
            total -= sum(log_probs[j, tokens[start + j]] for j in range(end - start))
            count += end - start
    else:
        for start in range(0, len(tokens) - max_length + 1, max_length):
            window = tokens[start : start + max_length]
            log_probs = _log_probs64(model, window[:-1])
            total -= sum(log_probs[j, window[j + 1]] for j in range(max_length - 1))
            count += max_length - 1
    return total, count


@pytest.mark.parametrize("windowing", ["rolling", "disjoint"])
@pytest.mark.parametrize(("n_chars", "max_length"), [(150, 32), (97, 16), (40, 64)])
def test_perplexity_matches_independent_reference(windowing, n_chars, max_length):
    text = _text(seed=n_chars, n_chars=n_chars)
    model = TinyCausalLM(seed=4)
    if windowing == "disjoint" and n_chars < max_length:
        with pytest.raises(ValueError, match="no scorable window"):
            perplexity_on_text(
                model, ByteTokenizer(), text, max_length=max_length, windowing=windowing
            )
        return
    result = perplexity_on_text(
        model, ByteTokenizer(), text, max_length=max_length, batch_size=3, windowing=windowing
    )
    nll, count = _reference_nll(TinyCausalLM(seed=4), list(text.encode()), max_length, windowing)
    assert result["token_count"] == count
    assert result["nll"] == pytest.approx(nll, rel=1e-10)
    assert result["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-10)
    assert result["byte_count"] == len(text.encode())
    if windowing == "rolling":
        assert count == len(text.encode())  # every token predicted once
        assert result["bits_per_byte"] == pytest.approx(nll / math.log(2) / len(text), rel=1e-12)
    else:
        assert result["bits_per_byte"] is None
        assert result["window_count"] == n_chars // max_length


def test_perplexity_is_batch_invariant_and_agrees_with_loglikelihood_rolling(tmp_path):
    text = _text(seed=5, n_chars=300)
    model = TinyCausalLM(seed=5)
    results = [
        perplexity_on_text(model, ByteTokenizer(), text, max_length=24, batch_size=b)
        for b in (1, 3, 64)
    ]
    assert results[0] == results[1] == results[2]
    lm = QuambaLM(model, ByteTokenizer(), max_length=24)
    (rolling,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], True)
    assert -rolling == pytest.approx(results[0]["nll"], rel=1e-12)
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    from_path = perplexity_on_text(model, ByteTokenizer(), path, max_length=24)
    from_str_path = perplexity_on_text(model, ByteTokenizer(), str(path), max_length=24)
    assert from_path["source"] == from_str_path["source"] == str(path)
    assert from_path["nll"] == from_str_path["nll"] == results[0]["nll"]
    assert from_path["text_sha256"] == results[0]["text_sha256"]


def test_perplexity_bad_inputs():
    model = TinyCausalLM()
    with pytest.raises(FileNotFoundError):
        perplexity_on_text(model, ByteTokenizer(), Path("/nonexistent/corpus.txt"))
    with pytest.raises(ValueError, match="windowing"):
        perplexity_on_text(model, ByteTokenizer(), "some text", windowing="sliding")
    with pytest.raises(ValueError, match="no scorable window"):
        perplexity_on_text(model, ByteTokenizer(), "")
    with pytest.raises(ValueError, match="max_length"):
        perplexity_on_text(model, ByteTokenizer(), "abc", max_length=1)
    with pytest.raises(TypeError, match="tokenizer"):
        perplexity_on_text(model, object(), "abc")


def _reference_fidelity(ref, model, windows):
    """numpy float64: KL(ref || model), top-1 agreement, both NLLs over all window positions."""
    kl, agree, nll_ref, nll_model, positions = 0.0, 0, 0.0, 0.0, 0
    for window in windows:
        lp_ref = _log_probs64(ref, window[:-1])
        lp_model = _log_probs64(model, window[:-1])
        p_ref = np.exp(lp_ref)
        kl += float(np.sum(p_ref * (lp_ref - lp_model)))
        agree += int(np.sum(lp_ref.argmax(-1) == lp_model.argmax(-1)))
        targets = np.array(window[1:])
        rows = np.arange(len(targets))
        nll_ref -= float(lp_ref[rows, targets].sum())
        nll_model -= float(lp_model[rows, targets].sum())
        positions += len(targets)
    return kl / positions, agree / positions, nll_ref / positions, nll_model / positions


@pytest.mark.parametrize("seed", [6, 7])
def test_fidelity_matches_numpy_reference(seed):
    rng = random.Random(seed)
    windows = [[rng.randrange(256) for _ in range(rng.randint(2, 33))] for _ in range(9)]
    ref, model = TinyCausalLM(seed=seed), _perturbed(seed)
    result = fidelity(ref, model, ByteTokenizer(), windows, max_length=32, batch_size=4)
    kl, agree, nll_ref, nll_model = _reference_fidelity(
        TinyCausalLM(seed=seed), _perturbed(seed), windows
    )
    assert result["position_count"] == sum(len(w) - 1 for w in windows)
    assert result["window_count"] == len(windows)
    assert result["kl_mean"] == pytest.approx(kl, rel=1e-9)
    assert 0.0 < result["kl_mean"] <= result["kl_max"]
    assert result["top1_agreement"] == pytest.approx(agree)
    assert 0.0 < result["top1_agreement"] < 1.0
    assert result["ref_perplexity"] == pytest.approx(math.exp(nll_ref), rel=1e-10)
    assert result["perplexity"] == pytest.approx(math.exp(nll_model), rel=1e-10)
    tensor_windows = torch.tensor([w[:2] for w in windows])
    assert fidelity(ref, model, ByteTokenizer(), tensor_windows)["position_count"] == len(windows)


def test_fidelity_of_a_model_with_itself_is_exact():
    model = TinyCausalLM(seed=8)
    result = fidelity(model, model, ByteTokenizer(), _text(8, 200), max_length=40)
    assert result["kl_mean"] == 0.0 and result["kl_max"] == 0.0
    assert result["top1_agreement"] == 1.0
    assert result["perplexity"] == result["ref_perplexity"]


def test_fidelity_on_texts_is_deterministic_and_matches_perplexity():
    texts = [_text(9, 120), _text(10, 75), "x"]
    ref, model = TinyCausalLM(seed=9), _perturbed(9)
    runs = [
        fidelity(ref, model, ByteTokenizer(), texts, max_length=32, batch_size=b) for b in (1, 5, 1)
    ]
    assert runs[0] == runs[1] == runs[2]  # batch size and repetition change nothing
    assert runs[0]["position_count"] == sum(len(t.encode()) for t in texts)
    single = perplexity_on_text(model, ByteTokenizer(), texts[0], max_length=32)
    alone = fidelity(ref, model, ByteTokenizer(), texts[0], max_length=32)
    assert alone["perplexity"] == pytest.approx(single["perplexity"], rel=1e-12)


def test_fidelity_bad_inputs():
    model = TinyCausalLM()
    with pytest.raises(ValueError, match="vocabulary sizes differ"):
        fidelity(model, TinyCausalLM(vocab=300), ByteTokenizer(), [[1, 2, 3]])
    with pytest.raises(ValueError, match="2 to max_length"):
        fidelity(model, model, ByteTokenizer(), [[1]])
    with pytest.raises(ValueError, match="2-D integer"):
        fidelity(model, model, ByteTokenizer(), torch.rand(2, 4))
    with pytest.raises(ValueError, match="non-empty"):
        fidelity(model, model, ByteTokenizer(), [])

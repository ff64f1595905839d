"""QuambaLM: lm-eval requests against an independent float64 reference, and batch independence."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model

from quamba_eval.lm import QuambaLM, rolling_windows
from quamba_eval.testing import EOS, ByteTokenizer, TinyCausalLM


class NoSeqLensLM(TinyCausalLM):
    """Same model with a forward that does not accept seq_lens."""

    def forward(self, input_ids):
        return super().forward(input_ids)


class LeakyLM(TinyCausalLM):
    """Negative control: every position sees the sum over the whole padded row."""

    def forward(self, input_ids, seq_lens=None):
        out = super().forward(input_ids, seq_lens)
        row_total = input_ids.float().sum(dim=1, keepdim=True)[:, :, None]
        leak = torch.remainder(row_total, 5.0) * self.head[:, 0]  # not a per-row constant
        return SimpleNamespace(logits=out.logits + leak)


def _instances(request_type, args_list):
    return [Instance(request_type, {}, args, idx) for idx, args in enumerate(args_list)]


def _random_text(rng, lo, hi):
    alphabet = "abcdefgh ijk lmnop, qrs. tuv wxyz"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


def _random_pairs(seed, n):
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        context = "" if i % 9 == 0 else _random_text(rng, 1, 80)
        if i % 5 == 0:
            context += " "  # trailing space moves into the continuation
        pairs.append((context, " " + _random_text(rng, 1, 12)))
    return pairs


def _reference_loglikelihood(model64, context, continuation, max_length):
    """Independent float64 computation, one request at a time, no batching or padding."""
    tok = ByteTokenizer()
    stripped = context.rstrip()  # trailing context whitespace belongs to the continuation
    context_ids = tok.encode(stripped) or [EOS]
    continuation_ids = tok.encode(context[len(stripped) :] + continuation)
    full = (context_ids + continuation_ids)[-(max_length + 1) :]
    with torch.no_grad():
        logits = model64(torch.tensor([full[:-1]])).logits[0]
    log_probs = torch.log_softmax(logits, dim=-1)[-len(continuation_ids) :]
    target = torch.tensor(continuation_ids)
    total = float(log_probs.gather(-1, target[:, None]).sum())
    greedy = bool((log_probs.argmax(-1) == target).all())
    return total, greedy


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("max_length", [24, 2048])
def test_loglikelihood_matches_float64_reference(exact, max_length):
    model = TinyCausalLM(seed=1, exact=exact)
    model64 = TinyCausalLM(seed=1, exact=exact).double()
    pairs = _random_pairs(seed=2, n=40)
    lm = QuambaLM(model, ByteTokenizer(), batch_size=8, max_length=max_length)
    results = lm.loglikelihood(_instances("loglikelihood", pairs), disable_tqdm=True)
    assert len(results) == len(pairs)
    tolerance = 1e-9 if exact else 1e-4
    n_greedy = 0
    for (context, continuation), (log_prob, greedy) in zip(pairs, results):
        ref_log_prob, ref_greedy = _reference_loglikelihood(
            model64, context, continuation, max_length
        )
        assert log_prob == pytest.approx(ref_log_prob, rel=tolerance, abs=tolerance)
        assert log_prob < 0
        if exact:
            assert greedy == ref_greedy
        n_greedy += greedy
    assert isinstance(results[0][0], float) and isinstance(results[0][1], bool)


@pytest.mark.parametrize("seed", [3, 4])
def test_loglikelihood_independent_of_batch_size_and_neighbours(seed):
    model = TinyCausalLM(seed=seed)
    pairs = _random_pairs(seed=seed, n=45)
    outputs = {}
    for batch_size in (1, 7, 64):
        lm = QuambaLM(model, ByteTokenizer(), batch_size=batch_size, max_length=64)
        model.calls.clear()
        outputs[batch_size] = lm.loglikelihood(_instances("loglikelihood", pairs), True)
        assert max(batch for batch, _, _ in model.calls) == min(batch_size, len(pairs))
        assert sum(batch for batch, _, _ in model.calls) == len(pairs)
    assert outputs[1] == outputs[7] == outputs[64]  # bit for bit
    # Other neighbours: a shuffled request list and a subset give the same per-request floats.
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    lm = QuambaLM(model, ByteTokenizer(), batch_size=7, max_length=64)
    shuffled = lm.loglikelihood(_instances("loglikelihood", [pairs[i] for i in order]), True)
    assert [shuffled[order.index(i)] for i in range(len(pairs))] == outputs[1]
    subset = lm.loglikelihood(_instances("loglikelihood", pairs[::4]), True)
    assert subset == outputs[1][::4]


def test_float_model_batching_differs_at_most_by_rounding():
    """A float32 model's GEMMs may round differently for other batch shapes (a model property,
    not the LM's): the differences stay at rounding level."""
    model = TinyCausalLM(seed=9, exact=False)
    model64 = TinyCausalLM(seed=9, exact=False).double()
    pairs = _random_pairs(seed=9, n=30)
    requests = _instances("loglikelihood", pairs)
    one = QuambaLM(model, ByteTokenizer(), batch_size=1, max_length=64).loglikelihood(
        requests, True
    )
    many = QuambaLM(model, ByteTokenizer(), batch_size=30, max_length=64).loglikelihood(
        requests, True
    )
    for (context, continuation), a, b in zip(pairs, one, many):
        reference, _ = _reference_loglikelihood(model64, context, continuation, 64)
        assert a[0] == pytest.approx(b[0], rel=1e-6, abs=1e-6)
        assert a[0] == pytest.approx(reference, rel=1e-5, abs=1e-5)


def test_batch_invariance_check_detects_a_leaky_model():
    """The invariance comparison above has teeth: a model that reads the padding fails it."""
    pairs = _random_pairs(seed=5, n=30)
    lm1 = QuambaLM(LeakyLM(seed=5), ByteTokenizer(), batch_size=1, max_length=64)
    lm8 = QuambaLM(LeakyLM(seed=5), ByteTokenizer(), batch_size=8, max_length=64)
    requests = _instances("loglikelihood", pairs)
    assert lm1.loglikelihood(requests, True) != lm8.loglikelihood(requests, True)


def test_model_without_seq_lens_gives_the_same_results():
    pairs = _random_pairs(seed=6, n=20)
    requests = _instances("loglikelihood", pairs)
    with_lens = QuambaLM(TinyCausalLM(seed=6), ByteTokenizer(), batch_size=6)
    without = QuambaLM(NoSeqLensLM(seed=6), ByteTokenizer(), batch_size=6)
    assert with_lens.loglikelihood(requests, True) == without.loglikelihood(requests, True)
    assert all(lens is not None for _, _, lens in with_lens.model.calls)


def _reference_rolling(model64, text, max_length):
    """Every token predicted once: window j predicts tokens [j*M, min((j+1)*M, n)) from the M
    tokens before its last prediction (EOS before the text)."""
    tokens = ByteTokenizer().encode(text)
    padded = [EOS, *tokens]  # padded[i] precedes tokens[i]
    total = 0.0
    for start in range(0, len(tokens), max_length):
        end = min(start + max_length, len(tokens))
        inp = padded[max(0, end - max_length) : end]
        with torch.no_grad():
            log_probs = torch.log_softmax(model64(torch.tensor([inp])).logits[0], dim=-1)
        scored = tokens[start:end]
        rows = log_probs[len(inp) - len(scored) :]
        total += float(rows.gather(-1, torch.tensor(scored)[:, None]).sum())
    return total


@pytest.mark.parametrize("max_length", [8, 16, 2048])
def test_loglikelihood_rolling_matches_reference_and_batching(max_length):
    rng = random.Random(7)
    texts = [_random_text(rng, 0, 70) for _ in range(12)] + ["x"]
    model = TinyCausalLM(seed=7)
    model64 = TinyCausalLM(seed=7).double()
    requests = _instances("loglikelihood_rolling", [(t,) for t in texts])
    results = {}
    for batch_size in (1, 5, 64):
        lm = QuambaLM(model, ByteTokenizer(), batch_size=batch_size, max_length=max_length)
        results[batch_size] = lm.loglikelihood_rolling(requests, disable_tqdm=True)
    assert results[1] == results[5] == results[64]
    for text, value in zip(texts, results[1]):
        expected = _reference_rolling(model64, text, max_length)
        assert value == pytest.approx(expected, rel=1e-10, abs=1e-10)
        assert (value == 0.0) == (text == "")


def test_rolling_windows_cover_every_token_once():
    tokens = list(range(23))
    for max_length in (1 + 1, 5, 23, 40):
        windows = rolling_windows(tokens, EOS, max_length)
        predicted = [t for _, continuation in windows for t in continuation]
        assert predicted == tokens
        assert all(len(ctx) + len(cont) - 1 <= max_length for ctx, cont in windows)


def _reference_generate(model64, context, until, max_gen_toks, max_length):
    tok = ByteTokenizer()
    ids = (tok.encode(context) or [EOS])[-(max_length - max_gen_toks) :]
    generated = []
    while len(generated) < max_gen_toks:
        with torch.no_grad():
            logits = model64(torch.tensor([ids + generated])).logits[0, -1, : tok.vocab_size]
        token = int(logits.argmax())
        if token == EOS:
            break
        generated.append(token)
        if any(s in tok.decode(generated) for s in until):
            break
    text = tok.decode(generated)
    for stop in until:
        text = text.split(stop)[0]
    return text


def test_generate_until_greedy_matches_reference_for_any_batch_size():
    rng = random.Random(8)
    model = TinyCausalLM(seed=8)
    model64 = TinyCausalLM(seed=8).double()
    args = []
    for i in range(11):
        until = [rng.choice("abcdefgh ,.")] if i % 3 else ["zz", "\n\n"]
        args.append(
            (_random_text(rng, 0 if i == 4 else 1, 40), {"until": until, "max_gen_toks": 3 + i})
        )
    requests = _instances("generate_until", args)
    outputs = {}
    for batch_size in (1, 4, 64):
        lm = QuambaLM(model, ByteTokenizer(), batch_size=batch_size, max_length=32)
        outputs[batch_size] = lm.generate_until(requests, disable_tqdm=True)
    assert outputs[1] == outputs[4] == outputs[64]
    for (context, kwargs), text in zip(args, outputs[1]):
        expected = _reference_generate(
            model64, context, kwargs["until"], kwargs["max_gen_toks"], 32
        )
        assert text == expected
        assert not any(stop in text for stop in kwargs["until"])
        assert len(text) <= kwargs["max_gen_toks"]  # one byte decodes to at most one char


def test_registered_with_lm_eval():
    assert get_model("quamba") is QuambaLM


def _const_model(output):
    class Const(torch.nn.Module):
        def forward(self, input_ids, seq_lens=None):
            return output(input_ids)

    return Const()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"batch_size": "auto"}, ValueError, "batch_size"),
        ({"max_length": 1}, ValueError, "max_length"),
        ({"tokenizer": object()}, TypeError, "tokenizer lacks"),
        ({"model": "state-spaces/mamba-130m"}, TypeError, "model object"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, error, match):
    arguments = {"model": TinyCausalLM(), "tokenizer": ByteTokenizer(), **kwargs}
    with pytest.raises(error, match=match):
        QuambaLM(**arguments)


def test_bad_model_outputs_and_requests_give_clear_errors():
    requests = _instances("loglikelihood", [("abc", " d")])
    no_logits = QuambaLM(_const_model(lambda ids: {"x": ids}), ByteTokenizer())
    with pytest.raises(TypeError, match="logits"):
        no_logits.loglikelihood(requests, True)
    wrong_shape = QuambaLM(_const_model(lambda ids: torch.zeros(ids.shape[0], 3)), ByteTokenizer())
    with pytest.raises(ValueError, match="shape"):
        wrong_shape.loglikelihood(requests, True)
    small_vocab = QuambaLM(
        _const_model(lambda ids: torch.ones(*ids.shape, 50)), ByteTokenizer(), batch_size=2
    )
    with pytest.raises(ValueError, match="vocabulary"):
        small_vocab.loglikelihood(requests, True)
    lm = QuambaLM(TinyCausalLM(), ByteTokenizer())
    with pytest.raises(ValueError, match="no tokens"):
        lm.loglikelihood(_instances("loglikelihood", [("abc", "")]), True)
    with pytest.raises(ValueError, match="greedy"):
        lm.generate_until(_instances("generate_until", [("a", {"do_sample": True})]), True)
    with pytest.raises(TypeError, match="model_args"):
        QuambaLM.create_from_arg_string("pretrained=x")

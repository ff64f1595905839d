"""lm-evaluation-harness model class for quamba models: `QuambaLM`, registered as "quamba".

Importing this module registers the class with lm-eval's model registry. The usual way to use it
is to build the model and tokenizer in Python and pass the object to `lm_eval.simple_evaluate`:

    lm = QuambaLM(model, tokenizer, batch_size=16)
    lm_eval.simple_evaluate(model=lm, tasks=[...], task_manager=...)

Model interface: `model(input_ids (B, L) int64, seq_lens=(B,) int64)` returns an object with
`.logits` (B, L, V) (or the logits tensor itself). Rows are right-padded; `seq_lens` is the number
of real tokens per row. `seq_lens` is passed only when the forward accepts it.
Tokenizer interface: `encode(text) -> list[int]`, `decode(ids) -> str`, `eos_token_id`,
`vocab_size`.

Batch independence: requests are sorted by length, batched and right-padded. With a causal model
the logits at the real positions of a row depend only on that row's tokens, so a request's result
does not depend on the batch size or on its batch neighbours. Log-probabilities are computed in
float64 from each request's own slice of logits, so this step adds no batch dependence either.
The result is bit-identical across batchings whenever the model's forward itself is row-wise
deterministic (true for exact-arithmetic models; float kernels whose reduction order changes with
the batch shape may add rounding-level differences).

Conventions shared with lm-eval's HFLM (so numbers are comparable with published lm-eval runs):
context/continuation tokenisation (`TemplateLM._encode_pair`), the EOS token as prefix for an empty
context, left truncation to `max_length`, rolling windows from `get_rolling_token_windows` +
`make_disjoint_window`, and the log-softmax over the model's full (possibly padded) vocabulary.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from lm_eval import utils as lm_eval_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import normalize_gen_kwargs
from tqdm import tqdm

__all__ = [
    "QuambaLM",
    "batched_logits",
    "check_tokenizer",
    "model_accepts_seq_lens",
    "resolve_device",
    "rolling_windows",
    "score_pairs",
    "target_log_probs",
]

# Rows of a (positions, vocab) logits slice converted to float64 at once; bounds memory for long
# windows with large vocabularies. Each row's log-softmax is independent of the others.
LOG_SOFTMAX_CHUNK = 256


def check_tokenizer(tokenizer: Any) -> None:
    """Raise TypeError unless `tokenizer` has encode, decode, an int eos_token_id and vocab_size."""
    missing = [
        name
        for name in ("encode", "decode", "eos_token_id", "vocab_size")
        if not hasattr(tokenizer, name)
    ]
    if missing:
        raise TypeError(
            f"tokenizer lacks {missing}; expected an object with encode(text) -> list[int], "
            "decode(ids) -> str, eos_token_id (int) and vocab_size (int)"
        )
    if not callable(tokenizer.encode) or not callable(tokenizer.decode):
        raise TypeError("tokenizer.encode and tokenizer.decode must be callable")
    for name in ("eos_token_id", "vocab_size"):
        value = getattr(tokenizer, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"tokenizer.{name} must be an int, got {value!r}")


def model_accepts_seq_lens(model: Any) -> bool:
    """True when the model's forward takes a `seq_lens` keyword (or **kwargs)."""
    forward = model.forward if isinstance(model, torch.nn.Module) else model
    try:
        parameters = inspect.signature(forward).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "seq_lens" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def resolve_device(model: Any, device: str | torch.device | None) -> torch.device:
    """The device for input tensors: `device` if given, else the model's first parameter's."""
    if device is not None:
        return torch.device(device)
    if isinstance(model, torch.nn.Module):
        for parameter in model.parameters():
            return parameter.device
        for buffer in model.buffers():
            return buffer.device
    return torch.device("cpu")


def _encode(tokenizer: Any, text: str) -> list[int]:
    return [int(t) for t in tokenizer.encode(text)]


def check_positive_int(name: str, value: Any, minimum: int = 1) -> int:
    """`value` as an int >= minimum (digit strings accepted), else ValueError naming `name`."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _forward_logits(
    model: Any, input_ids: torch.Tensor, seq_lens: torch.Tensor, pass_seq_lens: bool
) -> torch.Tensor:
    """Run the model on one right-padded batch and return its logits (B, L, V)."""
    output = model(input_ids, seq_lens=seq_lens) if pass_seq_lens else model(input_ids)
    logits = output if isinstance(output, torch.Tensor) else getattr(output, "logits", None)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(
            f"model output {type(output).__name__} has no tensor `.logits`; the model must return "
            "logits (B, L, V) or an object with a `.logits` attribute"
        )
    batch, length = input_ids.shape
    if logits.dim() != 3 or logits.shape[0] != batch or logits.shape[1] != length:
        raise ValueError(
            f"model returned logits of shape {tuple(logits.shape)} for input_ids of shape "
            f"{(batch, length)}; expected ({batch}, {length}, vocab)"
        )
    return logits


def batched_logits(
    model: Any,
    inputs: Sequence[Sequence[int]],
    n_scored: Sequence[int],
    *,
    batch_size: int,
    device: torch.device,
    pad_id: int,
    pass_seq_lens: bool | None = None,
    progress: bool = False,
    progress_desc: str = "scoring",
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield `(request index, logits)` for every input, sorted longest first, in batches.

    `logits` is the (n_scored[i], V) slice of the model's logits at the last `n_scored[i]` real
    positions of input i (the positions that predict the next `n_scored[i]` tokens). Inputs are
    right-padded with `pad_id`; each row only ever sees its own tokens, so the slices do not depend
    on `batch_size`. The order is a pure function of the inputs (length, then tokens, then index).
    """
    if len(inputs) != len(n_scored):
        raise ValueError(f"{len(inputs)} inputs but {len(n_scored)} n_scored values")
    for index, (tokens, count) in enumerate(zip(inputs, n_scored)):
        if len(tokens) == 0:
            raise ValueError(f"input {index} is empty; every scored input needs >= 1 token")
        if not 1 <= count <= len(tokens):
            raise ValueError(f"input {index}: n_scored={count} not in [1, {len(tokens)}]")
    if pass_seq_lens is None:
        pass_seq_lens = model_accepts_seq_lens(model)
    order = sorted(range(len(inputs)), key=lambda i: (-len(inputs[i]), tuple(inputs[i]), i))
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc=progress_desc, disable=not progress):
        batch_indices = order[start : start + batch_size]
        lengths = [len(inputs[i]) for i in batch_indices]
        padded = torch.full((len(batch_indices), max(lengths)), pad_id, dtype=torch.long)
        for row, i in enumerate(batch_indices):
            padded[row, : lengths[row]] = torch.as_tensor(list(inputs[i]), dtype=torch.long)
        seq_lens = torch.tensor(lengths, dtype=torch.long)
        # Leave no_grad before yielding, so the caller's code does not run under it.
        with torch.no_grad():
            logits = _forward_logits(model, padded.to(device), seq_lens.to(device), pass_seq_lens)
        for row, i in enumerate(batch_indices):
            yield i, logits[row, lengths[row] - n_scored[i] : lengths[row]]


def target_log_probs(logits: torch.Tensor, targets: Sequence[int]) -> tuple[torch.Tensor, bool]:
    """Float64 log-probabilities of `targets` under `logits` (n, V), and whether all are argmax.

    The log-softmax runs over the full vocabulary in float64, in row chunks (rows independent).
    """
    vocab = logits.shape[-1]
    if len(targets) != logits.shape[0]:
        raise ValueError(f"{len(targets)} targets for {logits.shape[0]} logits rows")
    if any(not 0 <= t < vocab for t in targets):
        raise ValueError(f"target token id outside the model vocabulary [0, {vocab})")
    target_tensor = torch.as_tensor(list(targets), dtype=torch.long, device=logits.device)
    picked = []
    greedy = True
    for start in range(0, logits.shape[0], LOG_SOFTMAX_CHUNK):
        chunk = torch.log_softmax(logits[start : start + LOG_SOFTMAX_CHUNK].double(), dim=-1)
        chunk_targets = target_tensor[start : start + LOG_SOFTMAX_CHUNK]
        picked.append(chunk.gather(-1, chunk_targets[:, None])[:, 0])
        greedy = greedy and bool((chunk.argmax(dim=-1) == chunk_targets).all())
    return torch.cat(picked), greedy


def rolling_windows(
    tokens: Sequence[int], prefix_token: int, max_length: int
) -> list[tuple[list[int], list[int]]]:
    """lm-eval's rolling windows: `(context, continuation)` pairs that score every token once.

    The first window is `[prefix_token] + tokens[:max_length - 1]` predicting `tokens[:max_length]`;
    each later window predicts the next `max_length` tokens (the last one fewer, with a full-length
    input of earlier tokens as context). Windows do not overlap in what they predict.
    """
    return [
        lm_eval_utils.make_disjoint_window(window)
        for window in lm_eval_utils.get_rolling_token_windows(
            token_list=list(tokens),
            prefix_token=prefix_token,
            max_seq_len=max_length,
            context_len=1,
        )
    ]


def score_pairs(
    model: Any,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    max_length: int,
    batch_size: int,
    device: torch.device,
    pad_id: int,
    pass_seq_lens: bool | None = None,
    progress: bool = False,
) -> list[tuple[float, bool]]:
    """(context tokens, continuation tokens) -> (sum of float64 log-probs, is_greedy) per pair.

    The model sees `(context + continuation)[-(max_length + 1):][:-1]` (left truncation, as in
    HFLM) and is scored on the continuation positions. Results come back in input order.
    """
    inputs, targets = [], []
    for index, (context, continuation) in enumerate(pairs):
        if not context:
            raise ValueError(f"request {index}: empty context tokens (use the EOS prefix)")
        if not continuation:
            raise ValueError(f"request {index}: the continuation encodes to no tokens")
        if len(continuation) > max_length:
            raise ValueError(
                f"request {index}: continuation of {len(continuation)} tokens exceeds "
                f"max_length={max_length}"
            )
        inputs.append((list(context) + list(continuation))[-(max_length + 1) :][:-1])
        targets.append(list(continuation))
    results: list[tuple[float, bool] | None] = [None] * len(pairs)
    for index, logits in batched_logits(
        model,
        inputs,
        [len(t) for t in targets],
        batch_size=batch_size,
        device=device,
        pad_id=pad_id,
        pass_seq_lens=pass_seq_lens,
        progress=progress,
        progress_desc="loglikelihood batches",
    ):
        log_probs, greedy = target_log_probs(logits, targets[index])
        results[index] = (float(log_probs.sum()), greedy)
    return results  # type: ignore[return-value]


@register_model("quamba")
class QuambaLM(TemplateLM):
    """lm-eval LM for a quamba (or any causal) model object and a simple tokenizer.

    Args:
        model: torch module (or callable) `model(input_ids, seq_lens=None)` -> `.logits` (B, L, V).
            It is put in eval mode.
        tokenizer: object with encode, decode, eos_token_id, vocab_size.
        batch_size: requests per forward call (results do not depend on it).
        max_length: maximum number of tokens per forward; longer inputs lose tokens on the left.
        device: device for the input tensors; default: the model's parameters' device.
    """

    backend = "causal"

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        batch_size: int = 16,
        max_length: int = 2048,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__()
        if isinstance(model, str):
            raise TypeError(
                "QuambaLM needs a model object, not a name or path; load the model in Python first"
            )
        if not callable(model):
            raise TypeError(f"model must be a callable torch module, got {type(model).__name__}")
        check_tokenizer(tokenizer)
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.max_length = check_positive_int("max_length", max_length, minimum=2)
        self.model = model
        if isinstance(model, torch.nn.Module):
            model.eval()
        self.tokenizer = tokenizer
        self._device = resolve_device(model, device)
        self._pass_seq_lens = model_accepts_seq_lens(model)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """Not supported: QuambaLM wraps a model object, which a string cannot describe."""
        raise TypeError(
            "QuambaLM cannot be built from --model_args; construct QuambaLM(model, tokenizer) in "
            "Python (or use the quamba-eval CLI) and pass the object to lm_eval.simple_evaluate"
        )

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        """Build from a dict that holds the model and tokenizer objects (None values ignored)."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        extra.pop("max_batch_size", None)
        return cls(**arg_dict, **extra)

    # ------------------------------------------------------------------ TemplateLM plumbing
    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return type(self.tokenizer).__name__

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs
    ) -> list[int]:
        return _encode(self.tokenizer, string)

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens))

    def get_model_info(self) -> dict[str, Any]:
        """Recorded by simple_evaluate under results['config']."""
        return {
            "model_class": type(self.model).__name__,
            "tokenizer_class": type(self.tokenizer).__name__,
            "max_length": self.max_length,
            "lm_batch_size": self.batch_size,
        }

    # ------------------------------------------------------------------ scoring core
    def _score_token_pairs(
        self, pairs: Sequence[tuple[list[int], list[int]]], disable_tqdm: bool = True
    ) -> list[tuple[float, bool]]:
        return score_pairs(
            self.model,
            pairs,
            max_length=self.max_length,
            batch_size=self.batch_size,
            device=self.device,
            pad_id=self.eot_token_id,
            pass_seq_lens=self._pass_seq_lens,
            progress=not disable_tqdm,
        )

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """TemplateLM hook: requests are ((context, continuation), context_enc, continuation_enc)."""
        answers = self._score_token_pairs(
            [(list(ctx), list(cont)) for _, ctx, cont in requests], disable_tqdm=disable_tqdm
        )
        for (request_strings, _, _), answer in zip(requests, answers):
            if request_strings is not None:
                self.cache_hook.add_partial("loglikelihood", request_strings, answer)
        return answers

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(context, continuation) -> (log P(continuation | context), continuation is greedy)."""
        token_requests = []
        for context, continuation in (request.args for request in requests):
            if not isinstance(context, str) or not isinstance(continuation, str):
                raise TypeError("loglikelihood requests must be (context: str, continuation: str)")
            if context == "":
                continuation_enc = self.tok_encode(continuation)
                if not continuation_enc:
                    raise ValueError(f"continuation {continuation!r} encodes to no tokens")
                context_enc = [self.eot_token_id]
            else:
                # lm-eval's split: trailing context whitespace moves into the continuation.
                context_enc, continuation_enc = self._encode_pair(context, continuation)
                if not context_enc:  # whitespace-only context: condition on EOS instead
                    context_enc = [self.eot_token_id]
            token_requests.append(((context, continuation), context_enc, continuation_enc))
        return self._loglikelihood_tokens(token_requests, disable_tqdm=disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Full log-likelihood of each string, EOS-prefixed, over disjoint max_length windows."""
        pairs, owner = [], []
        for index, (string,) in enumerate(request.args for request in requests):
            for window in rolling_windows(
                self.tok_encode(string), self.eot_token_id, self.max_length
            ):
                pairs.append(window)
                owner.append(index)
        totals = [0.0] * len(requests)
        window_scores = self._score_token_pairs(pairs, disable_tqdm=disable_tqdm)
        # Sum each request's windows in window order (fixed, batch independent).
        for index, (log_prob, _) in zip(owner, window_scores):
            totals[index] += log_prob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy generation until a stop string, EOS, or max_gen_toks tokens.

        Argmax is restricted to the tokenizer's ids (a padded model vocabulary has undecodable
        extra rows). Each step runs a full forward over every unfinished row (right-padded).
        """
        vocab_limit = int(self.tokenizer.vocab_size)
        contexts, stops, budgets = [], [], []
        for context, gen_kwargs in (request.args for request in requests):
            if not isinstance(gen_kwargs, dict):
                raise TypeError(
                    f"generation kwargs must be a dict, got {type(gen_kwargs).__name__}"
                )
            kwargs = normalize_gen_kwargs(gen_kwargs)
            if kwargs.get("do_sample"):
                raise ValueError(
                    "QuambaLM.generate_until only supports greedy decoding (do_sample=False, "
                    f"temperature=0); got {gen_kwargs}"
                )
            max_gen_toks = check_positive_int("max_gen_toks", kwargs["max_gen_toks"])
            if max_gen_toks >= self.max_length:
                raise ValueError(
                    f"max_gen_toks={max_gen_toks} leaves no room for context in "
                    f"max_length={self.max_length}"
                )
            until = [s for s in kwargs["until"] if isinstance(s, str) and s]
            context_enc = self.tok_encode(context) or [self.eot_token_id]
            contexts.append(context_enc[-(self.max_length - max_gen_toks) :])
            stops.append(until)
            budgets.append(max_gen_toks)

        generated: list[list[int]] = [[] for _ in requests]
        active = list(range(len(requests)))
        progress = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm)
        while active:
            sequences = [contexts[i] + generated[i] for i in active]
            still_active = []
            for row, logits in batched_logits(
                self.model,
                sequences,
                [1] * len(sequences),
                batch_size=self.batch_size,
                device=self.device,
                pad_id=self.eot_token_id,
                pass_seq_lens=self._pass_seq_lens,
            ):
                index = active[row]
                next_token = int(logits[0, :vocab_limit].argmax())
                finished = next_token == self.eot_token_id
                if not finished:
                    generated[index].append(next_token)
                    text = self.tok_decode(generated[index])
                    finished = len(generated[index]) >= budgets[index] or any(
                        stop in text for stop in stops[index]
                    )
                if finished:
                    progress.update(1)
                else:
                    still_active.append(index)
            active = sorted(still_active)
        progress.close()

        outputs = []
        for request, tokens, until in zip(requests, generated, stops):
            text = self.tok_decode(tokens)
            for stop in until:
                text = text.split(stop)[0]
            outputs.append(text)
            self.cache_hook.add_partial("generate_until", request.args, text)
        return outputs

"""Token-level perplexity of a model on a text, over non-overlapping windows.

Windowing (`windowing=`):
- "rolling" (default): lm-eval's `loglikelihood_rolling` windows. The whole text is tokenized once
  and the EOS token is put in front; window 1 is `[EOS] + t[0:M-1]` predicting `t[0:M]`; each later
  window predicts the next M tokens from the M tokens before them (the last window predicts fewer
  tokens but still gets a full M-token input of earlier text). Every token is predicted exactly once,
  so bits per byte is defined: total NLL / ln 2 / UTF-8 bytes of the text.
- "disjoint": the GPTQ / upstream-Quamba `ppl_eval` convention: `len(t) // M` windows
  `t[iM:(i+1)M]`, each scored on its last M-1 tokens from the tokens before them in the window;
  the tail shorter than M is dropped and the first token of each window is not predicted.
  Comparable with published wikitext-2 figures; bits per byte is not reported (None).

Perplexity = exp(total NLL / number of predicted tokens). Log-probabilities are float64 from the
model's logits (see `quamba_eval.lm`); results do not depend on `batch_size`.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Any

import torch

from quamba_eval.lm import (
    check_positive_int,
    check_tokenizer,
    model_accepts_seq_lens,
    resolve_device,
    rolling_windows,
    score_pairs,
)

__all__ = ["WINDOWINGS", "load_text", "perplexity_on_text", "text_windows"]

WINDOWINGS = ("rolling", "disjoint")


def load_text(path_or_text: str | os.PathLike) -> tuple[str, str]:
    """Return (text, source label). A Path must exist; a str naming an existing file is read."""
    if isinstance(path_or_text, os.PathLike):
        path = Path(path_or_text)
        if not path.is_file():
            raise FileNotFoundError(f"text file {path} does not exist")
        return path.read_text(encoding="utf-8"), str(path)
    if not isinstance(path_or_text, str):
        raise TypeError(f"expected a text or a file path, got {type(path_or_text).__name__}")
    if "\n" not in path_or_text and len(path_or_text) < 4096 and os.path.isfile(path_or_text):
        return Path(path_or_text).read_text(encoding="utf-8"), path_or_text
    return path_or_text, "<text>"


def text_windows(
    tokens: list[int], eos_token_id: int, max_length: int, windowing: str
) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) windows for `tokens` under `windowing` (see the module docstring)."""
    if windowing == "rolling":
        return rolling_windows(tokens, eos_token_id, max_length)
    if windowing == "disjoint":
        windows = [tokens[i : i + max_length] for i in range(0, len(tokens), max_length)]
        return [(w[:1], w[1:]) for w in windows if len(w) == max_length]
    raise ValueError(f"windowing must be one of {WINDOWINGS}, got {windowing!r}")


def perplexity_on_text(
    model: Any,
    tokenizer: Any,
    path_or_text: str | os.PathLike,
    max_length: int = 2048,
    batch_size: int = 8,
    *,
    windowing: str = "rolling",
    device: str | torch.device | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Perplexity of `model` on a text (or a UTF-8 file), over non-overlapping windows.

    Returns a dict: perplexity, nll (total, nats), mean_nll, token_count (predicted tokens),
    window_count, byte_count, bits_per_byte (rolling only, else None), max_length, windowing,
    source, text_sha256.
    """
    check_tokenizer(tokenizer)
    max_length = check_positive_int("max_length", max_length, minimum=2)
    batch_size = check_positive_int("batch_size", batch_size)
    if windowing not in WINDOWINGS:
        raise ValueError(f"windowing must be one of {WINDOWINGS}, got {windowing!r}")
    text, source = load_text(path_or_text)
    tokens = [int(t) for t in tokenizer.encode(text)]
    windows = text_windows(tokens, int(tokenizer.eos_token_id), max_length, windowing)
    if not windows:
        raise ValueError(
            f"the text gives no scorable window ({len(tokens)} tokens, windowing={windowing!r}, "
            f"max_length={max_length}); 'disjoint' needs at least max_length tokens"
        )
    if isinstance(model, torch.nn.Module):
        model.eval()
    scores = score_pairs(
        model,
        windows,
        max_length=max_length,
        batch_size=batch_size,
        device=resolve_device(model, device),
        pad_id=int(tokenizer.eos_token_id),
        pass_seq_lens=model_accepts_seq_lens(model),
        progress=progress,
    )
    nll = -math.fsum(log_prob for log_prob, _ in scores)
    token_count = sum(len(continuation) for _, continuation in windows)
    byte_count = len(text.encode("utf-8"))
    return {
        "perplexity": math.exp(nll / token_count),
        "nll": nll,
        "mean_nll": nll / token_count,
        "token_count": token_count,
        "window_count": len(windows),
        "byte_count": byte_count,
        "bits_per_byte": nll / math.log(2) / byte_count if windowing == "rolling" else None,
        "max_length": max_length,
        "windowing": windowing,
        "source": source,
        "text_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
    }

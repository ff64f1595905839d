"""How closely a model's next-token distributions follow a reference model's.

`fidelity(ref_model, model, ...)` streams over windows (batch by batch; nothing but running sums is
kept) and reports, over every scored position:
- mean KL(ref || model) of the next-token distributions, in nats, computed in float64 over the full
  vocabulary (positions where the reference probability underflows to 0 contribute 0);
- the top-1 agreement rate (argmax of both logits equal; ties go to the lowest id);
- both models' perplexities on the true next tokens.
Windows come from texts (lm-eval's rolling windows with an EOS prefix, as `perplexity_on_text`) or
are given as token-id windows (each scored on all its tokens after the first). The visiting order is
a pure function of the windows, so the result is deterministic and independent of `batch_size`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import torch

from quamba_eval.lm import (
    LOG_SOFTMAX_CHUNK,
    batched_logits,
    check_positive_int,
    check_tokenizer,
    model_accepts_seq_lens,
    resolve_device,
)
from quamba_eval.perplexity import load_text, text_windows

__all__ = ["fidelity", "fidelity_windows"]


def fidelity_windows(
    tokenizer: Any, texts_or_windows: Any, max_length: int
) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) windows from a text, a file path, a list of texts, a list of
    token-id windows or a 2-D integer tensor of windows."""
    if isinstance(texts_or_windows, (str, os.PathLike)):
        texts_or_windows = [texts_or_windows]
    if isinstance(texts_or_windows, torch.Tensor):
        if texts_or_windows.dim() != 2 or texts_or_windows.is_floating_point():
            raise ValueError("a tensor of windows must be 2-D integer token ids (N, L)")
        texts_or_windows = texts_or_windows.tolist()
    if not isinstance(texts_or_windows, Sequence) or len(texts_or_windows) == 0:
        raise ValueError("texts_or_windows must be a text, a path, or a non-empty list of them")
    windows: list[tuple[list[int], list[int]]] = []
    for index, item in enumerate(texts_or_windows):
        if isinstance(item, (str, os.PathLike)):
            text, _ = load_text(item)
            tokens = [int(t) for t in tokenizer.encode(text)]
            windows += text_windows(tokens, int(tokenizer.eos_token_id), max_length, "rolling")
        elif isinstance(item, Sequence | torch.Tensor):
            tokens = [int(t) for t in item]
            if not 2 <= len(tokens) <= max_length + 1:
                raise ValueError(
                    f"window {index} has {len(tokens)} tokens; need 2 to max_length + 1 "
                    f"({max_length + 1})"
                )
            windows.append((tokens[:1], tokens[1:]))
        else:
            raise TypeError(f"item {index} is a {type(item).__name__}; expected text or token ids")
    if not windows:
        raise ValueError("the inputs give no scorable window (empty texts?)")
    return windows


def _position_stats(
    ref_logits: torch.Tensor, logits: torch.Tensor, targets: list[int]
) -> tuple[float, float, int, float, float]:
    """Sums over positions: KL, max KL, top-1 agreements, ref NLL, model NLL (float64)."""
    logits = logits.to(ref_logits.device)
    target = torch.as_tensor(targets, dtype=torch.long, device=ref_logits.device)
    kl_sum = kl_max = nll_ref = nll_model = 0.0
    agree = 0
    for start in range(0, ref_logits.shape[0], LOG_SOFTMAX_CHUNK):
        rows = slice(start, start + LOG_SOFTMAX_CHUNK)
        lp_ref = torch.log_softmax(ref_logits[rows].double(), dim=-1)
        lp_model = torch.log_softmax(logits[rows].double(), dim=-1)
        p_ref = lp_ref.exp()
        terms = torch.where(p_ref > 0, p_ref * (lp_ref - lp_model), torch.zeros_like(p_ref))
        kl = terms.sum(dim=-1)
        kl_sum += float(kl.sum())
        kl_max = max(kl_max, float(kl.max()))
        agree += int((lp_ref.argmax(dim=-1) == lp_model.argmax(dim=-1)).sum())
        chunk_target = target[rows][:, None]
        nll_ref -= float(lp_ref.gather(-1, chunk_target).sum())
        nll_model -= float(lp_model.gather(-1, chunk_target).sum())
    return kl_sum, kl_max, agree, nll_ref, nll_model


def fidelity(
    ref_model: Any,
    model: Any,
    tokenizer: Any,
    texts_or_windows: Any,
    *,
    max_length: int = 2048,
    batch_size: int = 8,
    ref_device: str | torch.device | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Compare `model` with `ref_model` position by position (see the module docstring).

    Returns a dict: kl_mean, kl_max (nats), top1_agreement, ref_perplexity, perplexity,
    position_count, window_count, max_length.
    """
    check_tokenizer(tokenizer)
    max_length = check_positive_int("max_length", max_length, minimum=2)
    batch_size = check_positive_int("batch_size", batch_size)
    windows = fidelity_windows(tokenizer, texts_or_windows, max_length)
    inputs = [(ctx + cont)[-(max_length + 1) :][:-1] for ctx, cont in windows]
    targets = [cont for _, cont in windows]
    counts = [len(t) for t in targets]
    for m in (ref_model, model):
        if isinstance(m, torch.nn.Module):
            m.eval()
    common = {"batch_size": batch_size, "pad_id": int(tokenizer.eos_token_id)}
    ref_stream = batched_logits(
        ref_model,
        inputs,
        counts,
        device=resolve_device(ref_model, ref_device),
        pass_seq_lens=model_accepts_seq_lens(ref_model),
        progress=progress,
        progress_desc="fidelity batches",
        **common,
    )
    model_stream = batched_logits(
        model,
        inputs,
        counts,
        device=resolve_device(model, device),
        pass_seq_lens=model_accepts_seq_lens(model),
        **common,
    )
    kl_sum = kl_max = nll_ref = nll_model = 0.0
    agree = positions = 0
    for (index, ref_logits), (other_index, logits) in zip(ref_stream, model_stream):
        assert index == other_index  # same inputs, same order
        if ref_logits.shape[-1] != logits.shape[-1]:
            raise ValueError(
                f"vocabulary sizes differ: reference {ref_logits.shape[-1]}, "
                f"model {logits.shape[-1]}"
            )
        if max(targets[index]) >= logits.shape[-1]:
            raise ValueError(f"window {index} has token ids outside the model vocabulary")
        stats = _position_stats(ref_logits, logits, targets[index])
        kl_sum += stats[0]
        kl_max = max(kl_max, stats[1])
        agree += stats[2]
        nll_ref += stats[3]
        nll_model += stats[4]
        positions += counts[index]
    return {
        "kl_mean": kl_sum / positions,
        "kl_max": kl_max,
        "top1_agreement": agree / positions,
        "ref_perplexity": math.exp(nll_ref / positions),
        "perplexity": math.exp(nll_model / positions),
        "position_count": positions,
        "window_count": len(windows),
        "max_length": max_length,
    }

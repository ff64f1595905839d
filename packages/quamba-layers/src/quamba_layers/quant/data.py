"""Calibration data: N samples x L tokens from a local text/JSONL file or a hub dataset.

The order is fixed (file order), the exact token tensor is hashed, and both are recorded. Text is
tokenized per document (JSONL "text" fields, or the whole .txt file), documents are joined with the
tokenizer's EOS token, and the stream is cut into consecutive non-overlapping windows of L tokens.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class CalibrationSet:
    token_ids: torch.Tensor  # (N, L) int64
    source: dict = field(default_factory=dict)

    def describe(self) -> dict:
        digest = hashlib.sha256(self.token_ids.to(torch.int64).numpy().tobytes()).hexdigest()
        return {
            **self.source,
            "num_samples": int(self.token_ids.shape[0]),
            "seq_len": int(self.token_ids.shape[1]),
            "token_sha256": digest,
            "order": "file order, consecutive windows",
        }


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _documents_from_file(path: Path) -> list[str]:
    if path.suffix == ".jsonl":
        docs = []
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{line_no}: not valid JSON ({exc})") from None
                if not isinstance(record, dict) or "text" not in record:
                    raise ValueError(f"{path}:{line_no}: expected an object with a 'text' field")
                docs.append(str(record["text"]))
        return docs
    return [path.read_text(encoding="utf-8")]


def calibration_set_from_texts(
    texts: list[str], tokenizer, num_samples: int, seq_len: int, source: dict | None = None
) -> CalibrationSet:
    """Consecutive windows of ``seq_len`` tokens over the EOS-joined documents, in order."""
    if num_samples < 1 or seq_len < 1:
        raise ValueError(f"num_samples and seq_len must be >= 1, got {num_samples} x {seq_len}")
    needed = num_samples * seq_len
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer.encode(text))
        stream.append(tokenizer.eos_token_id)
        if len(stream) >= needed:
            break
    if len(stream) < needed:
        raise ValueError(
            f"calibration data too short: {len(stream)} tokens, but {num_samples} samples x "
            f"{seq_len} tokens = {needed} were asked for; use fewer samples or a shorter length"
        )
    ids = torch.tensor(stream[:needed], dtype=torch.int64).reshape(num_samples, seq_len)
    return CalibrationSet(ids, dict(source or {}))


def calibration_set(
    source: str | Path | list[str], tokenizer, num_samples: int = 512, seq_len: int = 512
) -> CalibrationSet:
    """Calibration samples from a .txt/.jsonl path, a list of texts, or a hub dataset id.

    Hub ids ("hf:monology/pile-uncopyrighted") stream the dataset's "text" field in its stored order
    via the ``datasets`` library (online only).
    """
    if isinstance(source, list):
        return calibration_set_from_texts(
            source, tokenizer, num_samples, seq_len, {"kind": "texts", "num_texts": len(source)}
        )
    text = str(source)
    if text.startswith("hf:"):
        return _from_hub(text[3:], tokenizer, num_samples, seq_len)
    path = Path(text)
    if not path.is_file():
        raise FileNotFoundError(
            f"calibration data {path} not found: give a .txt or .jsonl file, or hf:<dataset id>"
        )
    docs = _documents_from_file(path)
    described = {"kind": "file", "path": str(path), "sha256": file_sha256(path)}
    return calibration_set_from_texts(docs, tokenizer, num_samples, seq_len, described)


def _from_hub(dataset_id: str, tokenizer, num_samples: int, seq_len: int) -> CalibrationSet:
    try:
        import datasets
    except ImportError:
        raise RuntimeError("hub calibration data needs the 'datasets' package") from None
    name, _, split = dataset_id.partition("@")
    stream = datasets.load_dataset(name, split=split or "validation", streaming=True)
    texts = []
    total = 0
    for record in stream:
        texts.append(record["text"])
        total += len(record["text"])
        if total > 8 * num_samples * seq_len:  # plenty of characters for the token budget
            break
    source = {"kind": "hub", "dataset": name, "split": split or "validation"}
    return calibration_set_from_texts(texts, tokenizer, num_samples, seq_len, source)

"""Tokenizers for the FP and quantized Mamba models.

Two tokenizers with one interface (`encode(text) -> list[int]`, `decode(ids) -> str`,
`eos_token_id`, `vocab_size`):
- `HFTokenizer`: a `tokenizers.Tokenizer` read from a `tokenizer.json` (the GPT-NeoX-20B BPE of
  the state-spaces/mamba-* models: 50,277 ids, end-of-text id 0);
- `ByteTokenizer`: UTF-8 bytes as ids 0..255 plus an end-of-text id 256 (for tiny models).

`load_tokenizer` reads either from a file, a directory or a hub id.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["ByteTokenizer", "HFTokenizer", "load_tokenizer"]

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>")


def _ids_to_list(ids: Any, vocab_size: int) -> list[int]:
    """Token ids (a sequence of ints, or a 0-/1-D integer tensor) as a checked list."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if isinstance(ids, int):
        ids = [ids]
    if isinstance(ids, str | bytes) or not isinstance(ids, Iterable):
        raise TypeError(f"ids must be a sequence of ints, got {type(ids).__name__}")
    ids = list(ids)
    for token in ids:
        if isinstance(token, bool) or not isinstance(token, int):
            raise TypeError(f"ids must be ints, got {token!r}")
        if not 0 <= token < vocab_size:
            raise ValueError(f"token id {token} is out of range [0, {vocab_size})")
    return ids


def _check_text(text: Any) -> str:
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return text


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255, plus an end-of-text id 256 (vocab_size 257)."""

    eos_token_id = 256
    vocab_size = 257

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of `text` (no end-of-text id is added)."""
        return list(_check_text(text).encode("utf-8"))

    def decode(self, ids: Any) -> str:
        """Bytes back to text; end-of-text ids are skipped, invalid UTF-8 becomes U+FFFD."""
        ids = _ids_to_list(ids, self.vocab_size)
        return bytes(token for token in ids if token != self.eos_token_id).decode(
            "utf-8", errors="replace"
        )

    def save(self, directory: str | os.PathLike) -> Path:
        """Write `tokenizer_config.json` ({"type": "byte"}) that `load_tokenizer` recognises."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / TOKENIZER_CONFIG
        text = json.dumps({"type": "byte", "eos_token_id": self.eos_token_id}, indent=2)
        path.write_text(text + "\n", encoding="utf-8")
        return path

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=257, eos_token_id=256)"


class HFTokenizer:
    """A `tokenizers.Tokenizer` (from a tokenizer.json) with the ByteTokenizer interface."""

    def __init__(self, tokenizer: Any, eos_token: str | None = None) -> None:
        from tokenizers import Tokenizer

        if not isinstance(tokenizer, Tokenizer):
            raise TypeError(f"expected a tokenizers.Tokenizer, got {type(tokenizer).__name__}")
        self.tokenizer = tokenizer
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        candidates = (eos_token,) if eos_token is not None else _EOS_CANDIDATES
        self.eos_token_id: int | None = None
        for token in candidates:
            token_id = tokenizer.token_to_id(token)
            if token_id is not None:
                self.eos_token_id = token_id
                break

    @classmethod
    def from_file(cls, path: str | os.PathLike, eos_token: str | None = None) -> HFTokenizer:
        """Read a tokenizer.json file."""
        from tokenizers import Tokenizer

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer file at {path}")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as error:
            raise ValueError(f"{path} is not a valid tokenizer.json: {error}") from error
        return cls(tokenizer, eos_token=eos_token)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without added special tokens."""
        return self.tokenizer.encode(_check_text(text), add_special_tokens=False).ids

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        """Text of `ids` (special tokens such as end-of-text skipped by default)."""
        ids = _ids_to_list(ids, self.vocab_size)
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size}, eos_token_id={self.eos_token_id})"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error


def _eos_from_config(config: Any) -> str | None:
    """The eos token string named by a transformers tokenizer_config.json, if any."""
    if not isinstance(config, dict):
        return None
    eos = config.get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    return eos if isinstance(eos, str) else None


def _load_from_directory(directory: Path) -> ByteTokenizer | HFTokenizer:
    config_path = directory / TOKENIZER_CONFIG
    config = _read_json(config_path) if config_path.is_file() else None
    if isinstance(config, dict) and config.get("type") == "byte":
        return ByteTokenizer()
    if (directory / TOKENIZER_JSON).is_file():
        return HFTokenizer.from_file(directory / TOKENIZER_JSON, eos_token=_eos_from_config(config))
    raise FileNotFoundError(
        f"no tokenizer in {directory}: expected {TOKENIZER_JSON}, or {TOKENIZER_CONFIG} with "
        '{"type": "byte"}'
    )


def load_tokenizer(path_or_hub_id: str | os.PathLike) -> ByteTokenizer | HFTokenizer:
    """Load a tokenizer from a tokenizer.json file, a directory or a hub id ('owner/name').

    A directory (or file) holding `tokenizer_config.json` with `{"type": "byte"}` gives a
    `ByteTokenizer`; a `tokenizer.json` gives an `HFTokenizer`. Hub ids are fetched with
    huggingface_hub (only the local cache when HF_HUB_OFFLINE is set).
    """
    from .loading import download_from_hub, is_hub_id

    if not isinstance(path_or_hub_id, str | os.PathLike):
        raise TypeError(
            "path_or_hub_id must be a path or a hub id 'owner/name', "
            f"got {type(path_or_hub_id).__name__}"
        )
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return _load_from_directory(path)
    if path.is_file():
        if path.name == TOKENIZER_CONFIG:
            return _load_from_directory(path.parent)
        return HFTokenizer.from_file(path)
    if isinstance(path_or_hub_id, str) and is_hub_id(path_or_hub_id):
        directory = download_from_hub(
            path_or_hub_id,
            pattern_sets=[[TOKENIZER_JSON, TOKENIZER_CONFIG]],
            wanted=[TOKENIZER_JSON],
        )
        return _load_from_directory(directory)
    raise FileNotFoundError(
        f"no tokenizer at {path_or_hub_id}: pass a tokenizer.json file, a directory holding "
        "one, or a hub id 'owner/name'"
    )

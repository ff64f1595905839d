"""Tokenizers: the GPT-NeoX-20B tokenizer.json of the Mamba models, and the byte tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from quamba_layers.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

_REPO_ROOT = Path(__file__).resolve().parents[3]
_NEOX_CANDIDATES = [
    root / "shared/data/tokenizers/gpt-neox-20b/tokenizer.json"
    for root in (_REPO_ROOT.parent, _REPO_ROOT)  # ../shared beside the checkout, or inside it
]
NEOX_JSON = next((p for p in _NEOX_CANDIDATES if p.is_file()), _NEOX_CANDIDATES[0])

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.\n\nSecond paragraph,\twith a tab.",
    "  leading and trailing spaces  ",
    "Ünïcödé — “quotes”, 数字 123, emoji 🐍🚀",
    "def f(x):\n    return x ** 2  # code\n",
]


@pytest.fixture(scope="module")
def neox():
    if not NEOX_JSON.is_file():
        pytest.skip(f"GPT-NeoX-20B tokenizer not found at {NEOX_JSON}")
    return load_tokenizer(NEOX_JSON)


@pytest.mark.parametrize("text", TEXTS)
def test_neox_round_trips_text(neox, text):
    ids = neox.encode(text)
    assert ids and all(isinstance(i, int) and 0 <= i < neox.vocab_size for i in ids)
    assert neox.decode(ids) == text


def test_neox_known_ids_and_special_tokens(neox):
    assert isinstance(neox, HFTokenizer)
    assert neox.vocab_size == 50277  # the model pads this to 50280
    assert neox.eos_token_id == 0  # <|endoftext|>
    assert neox.encode("Hello world") == [12092, 1533]
    assert neox.decode([neox.eos_token_id, 12092]) == "Hello"  # eos skipped
    assert neox.decode([0, 12092], skip_special_tokens=False) == "<|endoftext|>Hello"
    assert neox.decode(torch.tensor([12092, 1533])) == "Hello world"  # tensors accepted


def test_neox_loads_from_a_directory(neox, tmp_path):
    (tmp_path / "tokenizer.json").symlink_to(NEOX_JSON)
    from_dir = load_tokenizer(tmp_path)
    assert from_dir.encode(TEXTS[1]) == neox.encode(TEXTS[1])
    # A transformers-style tokenizer_config.json names the eos token.
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": {"content": "<|padding|>"}})
    )
    assert load_tokenizer(str(tmp_path)).eos_token_id == 1


@pytest.mark.parametrize("text", TEXTS)
def test_byte_tokenizer_round_trips_text(text):
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids)
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode([*ids, tokenizer.eos_token_id]) == text  # eos skipped


def test_byte_tokenizer_interface_and_invalid_utf8():
    tokenizer = ByteTokenizer()
    assert (tokenizer.vocab_size, tokenizer.eos_token_id) == (257, 256)
    assert tokenizer.decode([0xE2, 0x82]) == "\ufffd"  # truncated UTF-8 is replaced, not raised
    assert tokenizer.decode(torch.tensor([104, 105])) == "hi"


def test_byte_tokenizer_saves_a_description_load_tokenizer_recognises(tmp_path):
    path = ByteTokenizer().save(tmp_path)
    assert json.loads(path.read_text())["type"] == "byte"
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)
    assert isinstance(load_tokenizer(path), ByteTokenizer)
    # The byte description wins over a tokenizer.json beside it.
    (tmp_path / "tokenizer.json").write_text("{}")
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)


@pytest.mark.parametrize("tokenizer_kind", ["byte", "neox"])
def test_bad_inputs(tokenizer_kind, request):
    tokenizer = ByteTokenizer() if tokenizer_kind == "byte" else request.getfixturevalue("neox")
    with pytest.raises(TypeError, match="text must be a str"):
        tokenizer.encode(b"bytes")
    with pytest.raises(ValueError, match="out of range"):
        tokenizer.decode([tokenizer.vocab_size])
    with pytest.raises(ValueError, match="out of range"):
        tokenizer.decode([-1])
    with pytest.raises(TypeError, match="ints"):
        tokenizer.decode([1.5])
    with pytest.raises(TypeError, match="sequence of ints"):
        tokenizer.decode("abc")


def test_load_tokenizer_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no tokenizer in"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="no tokenizer at"):
        load_tokenizer(str(tmp_path / "a" / "b" / "c"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not a tokenizer")
    with pytest.raises(ValueError, match=r"not a valid tokenizer\.json"):
        load_tokenizer(bad)
    (tmp_path / "tokenizer_config.json").write_text("{broken")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_tokenizer(tmp_path)
    with pytest.raises(TypeError, match="path_or_hub_id"):
        load_tokenizer(42)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="local copy"):
        load_tokenizer("quamba-tests/no-such-tokenizer-xyz")

"""The built-in `builtin_recall` task: determinism, answerable targets, train/eval disjointness."""

from __future__ import annotations

import hashlib
import json

import lm_eval
import pytest

from quamba_eval import builtin_task
from quamba_eval.lm import QuambaLM
from quamba_eval.tasks import build_task_manager
from quamba_eval.testing import ByteTokenizer, TinyCausalLM

# sha256 of write_task_file(path) with the defaults (n=500, seed=1234): a reproducibility contract.
DEFAULT_FILE_SHA256 = "1dfe975a307bcc1623e350ae210e5967c4c917fd863ec06912c74348851a7fcd"


@pytest.mark.parametrize(("n", "seed"), [(40, 0), (40, 7), (120, 1234)])
def test_same_seed_same_documents_and_file(tmp_path, n, seed):
    first = builtin_task.generate_documents(n, seed)
    assert first == builtin_task.generate_documents(n, seed)
    assert len(first) == n and len({d["text"] for d in first}) == n
    sha_a = builtin_task.write_task_file(tmp_path / "a.jsonl", n=n, seed=seed)
    sha_b = builtin_task.write_task_file(tmp_path / "sub" / "b.jsonl", n=n, seed=seed)
    assert sha_a == sha_b == hashlib.sha256((tmp_path / "a.jsonl").read_bytes()).hexdigest()
    lines = (tmp_path / "a.jsonl").read_text(encoding="ascii").splitlines()
    assert [json.loads(line) for line in lines] == first
    other = builtin_task.generate_documents(n, seed + 1)
    assert other != first


def test_default_file_hash_is_stable(tmp_path):
    assert builtin_task.write_task_file(tmp_path / "t.jsonl") == DEFAULT_FILE_SHA256
    assert hashlib.sha256(builtin_task.task_file_bytes()).hexdigest() == DEFAULT_FILE_SHA256


def test_targets_are_single_words_recoverable_from_context():
    docs = builtin_task.generate_documents(300, seed=3)
    vocabulary = {
        w.lower()
        for words in (
            builtin_task.NAMES,
            builtin_task.OBJECTS,
            builtin_task.PLACES,
            builtin_task.CITIES,
            builtin_task.PET_NAMES,
            builtin_task.COLORS,
        )
        for w in words
    }
    for doc in docs:
        text = doc["text"]
        assert "  " not in text and text == text.strip()
        words = text.split(" ")
        target = " " + words[-1]  # lm-eval lambada_openai's doc_to_target
        assert words[-1].isalpha() and words[-1].lower() in vocabulary
        prompt = " ".join(words[:-1])  # lm-eval lambada_openai's doc_to_text
        introduction = prompt.split(". ")[0]
        assert target.strip() in introduction.replace(",", " ").replace(".", " ").split()
    kinds = {doc["text"].split(" ")[-1] for doc in docs}
    assert len(kinds) > 30  # answers are varied, not one repeated word


def test_fillers_use_no_entity_words():
    entity_words = {
        w.lower()
        for words in (
            builtin_task.NAMES,
            builtin_task.OBJECTS,
            builtin_task.PLACES,
            builtin_task.CITIES,
            builtin_task.PET_NAMES,
            builtin_task.COLORS,
            builtin_task.ANIMALS,
        )
        for w in words
    }
    for sentence in builtin_task.FILLERS:
        tokens = sentence.lower().replace(",", " ").replace(".", " ").split()
        assert not entity_words & set(tokens), sentence


@pytest.mark.parametrize("train_seed", [0, 1234, 99])
def test_training_documents_never_equal_eval_documents(train_seed):
    eval_texts = {d["text"] for d in builtin_task.generate_documents(500, seed=1234)}
    training = builtin_task.training_documents(3000, seed=train_seed)
    assert len(training) == 3000
    assert not eval_texts & set(training)

    # Stronger: no eval story's introduction + recall (without fillers) occurs in training.
    def skeleton(text):
        sentences = text.split(". ")
        return sentences[0], sentences[-1]

    assert not {skeleton(t) for t in eval_texts} & {skeleton(t) for t in training}
    text = builtin_task.training_text(200, seed=train_seed)
    assert text.split("\n") == training[:200]
    assert builtin_task.training_text(200, seed=train_seed) == text


def test_bad_arguments():
    with pytest.raises(ValueError, match="number of documents"):
        builtin_task.generate_documents(-1)
    with pytest.raises(TypeError, match="seed"):
        builtin_task.training_documents(3, seed="1")


def test_builtin_recall_runs_through_lambada_definition(tmp_path):
    manager, names, provenance = build_task_manager(
        ["builtin_recall"], cache_dir=tmp_path, builtin_n_docs=60, builtin_seed=5
    )
    assert names == ["builtin_recall"]
    record = provenance["builtin_recall"]
    assert record["lm_eval_task"] == "lambada_openai"
    expected_sha = builtin_task.write_task_file(tmp_path / "copy.jsonl", n=60, seed=5)
    assert record["data_file"]["sha256"] == expected_sha
    task = manager.load(names)["tasks"]["builtin_recall"]
    docs = task.eval_docs.to_list()
    assert docs == builtin_task.generate_documents(60, 5)
    for doc in docs[:20]:
        assert task.doc_to_target(doc) == " " + doc["text"].split(" ")[-1]
        assert task.doc_to_text(doc) + task.doc_to_target(doc) == doc["text"]
    results = lm_eval.simple_evaluate(
        model=QuambaLM(TinyCausalLM(seed=2), ByteTokenizer(), batch_size=8),
        tasks=names,
        task_manager=manager,
        limit=12,
        log_samples=True,
        bootstrap_iters=0,
    )
    metrics = results["results"]["builtin_recall"]
    assert 0.0 <= metrics["acc,none"] <= 1.0 and metrics["perplexity,none"] > 1.0
    assert len(results["samples"]["builtin_recall"]) == 12

"""Local offline task variants: same per-sample results as lm-eval's own definitions.

Data: $QUAMBA_DATA_DIR, default <repo>/../shared/data; tests needing it skip when it is absent.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import datasets
import lm_eval
import pytest
from lm_eval.tasks import TaskManager

from quamba_eval.lm import QuambaLM
from quamba_eval.tasks import LM_EVAL_TASKS_DIR, build_task_manager, offline_mode
from quamba_eval.testing import ByteTokenizer, TinyCausalLM

LAMBADA_SHA256 = "4aa8d02cd17c719165fc8a7887fddd641f43fcafa4b1c806ca8abc31fabdb226"


def _data_dir() -> Path:
    default = Path(__file__).resolve().parents[3].parent / "shared" / "data"
    path = Path(os.environ.get("QUAMBA_DATA_DIR", default))
    if not (path / "lambada_openai" / "lambada_test.jsonl").is_file():
        pytest.skip(f"shared data not found at {path} (set QUAMBA_DATA_DIR)")
    return path


def _evaluate(task, manager, limit, batch_size=8):
    lm = QuambaLM(TinyCausalLM(seed=11), ByteTokenizer(), batch_size=batch_size)
    return lm_eval.simple_evaluate(
        model=lm,
        tasks=[task],
        task_manager=manager,
        limit=limit,
        log_samples=True,
        bootstrap_iters=0,
    )


def _original_lambada_task(lambada_file: Path, monkeypatch):
    """lm-eval's own lambada_openai task (its installed YAML, its loader), with only the dataset
    swapped: the hub download is replaced by the same local JSON file loaded with `datasets`."""
    real_load_dataset = datasets.load_dataset

    def load_same_file(path, name=None, **kwargs):
        assert (path, name) == ("EleutherAI/lambada_openai", "default")
        test = real_load_dataset("json", data_files=str(lambada_file), split="train")
        return datasets.DatasetDict({"test": test})

    monkeypatch.setattr(datasets, "load_dataset", load_same_file)
    plain = TaskManager(include_path=str(LM_EVAL_TASKS_DIR / "lambada"), include_defaults=False)
    with offline_mode():
        task = plain.load(["lambada_openai"])["tasks"]["lambada_openai"]
    monkeypatch.setattr(datasets, "load_dataset", real_load_dataset)
    assert task.config.dataset_path == "EleutherAI/lambada_openai"
    return task


@pytest.fixture(scope="module")
def lambada_pair(tmp_path_factory):
    """(original task, local task, manager, provenance) for lambada_openai on the shared file."""
    data_dir = _data_dir()
    cache = tmp_path_factory.mktemp("cache")
    manager, names, provenance = build_task_manager(
        ["lambada_openai"], data_dir=data_dir, cache_dir=cache
    )
    assert names == ["lambada_openai_local"]
    local = manager.load(names)["tasks"]["lambada_openai_local"]
    with pytest.MonkeyPatch.context() as monkeypatch:
        original = _original_lambada_task(
            data_dir / "lambada_openai" / "lambada_test.jsonl", monkeypatch
        )
    return original, local, manager, provenance


def test_lambada_local_equals_lm_eval_definition_per_sample(lambada_pair):
    """THE PROOF: the local variant gives, sample by sample, exactly what lm-eval's own
    lambada_openai definition gives on the same file with the same model."""
    original, local, manager, _ = lambada_pair
    limit = 48
    results_original = _evaluate(original, manager, limit)
    results_local = _evaluate(local, manager, limit, batch_size=5)
    samples_original = results_original["samples"]["lambada_openai"]
    samples_local = results_local["samples"]["lambada_openai_local"]
    assert len(samples_original) == len(samples_local) == limit
    keys = ("doc_id", "doc", "target", "arguments", "resps", "filtered_resps", "acc", "perplexity")
    for a, b in zip(samples_original, samples_local):
        for key in (*keys, "doc_hash", "prompt_hash", "target_hash"):
            assert a[key] == b[key], key
        context, continuation = a["arguments"][0]
        assert context + continuation == a["doc"]["text"]
        assert continuation.startswith(" ") and " " not in continuation[1:]
    log_likelihoods = [s["resps"][0][0][0] for s in samples_local]
    assert len(set(log_likelihoods)) > limit // 2  # real, varied numbers
    assert all(v < 0 for v in log_likelihoods)
    metrics_original = results_original["results"]["lambada_openai"]
    metrics_local = results_local["results"]["lambada_openai_local"]
    for metric in ("acc,none", "perplexity,none"):
        assert metrics_original[metric] == metrics_local[metric]


def test_lambada_local_has_every_doc_and_the_same_prompt_definition(lambada_pair):
    original, local, _, provenance = lambada_pair
    docs_original = original.eval_docs.to_list()
    docs_local = local.eval_docs.to_list()
    assert len(docs_local) == 5153 == provenance["lambada_openai_local"]["n_docs"]
    assert docs_original == docs_local
    for field in ("doc_to_text", "doc_to_target", "metric_list", "output_type", "target_delimiter"):
        assert getattr(original.config, field) == getattr(local.config, field), field
    assert original.config.metadata["version"] == local.config.metadata["version"] == 1.0
    rng = random.Random(12)
    for index in [0, len(docs_local) - 1, *rng.sample(range(len(docs_local)), 150)]:
        doc = docs_local[index]
        assert local.doc_to_text(doc) == original.doc_to_text(doc)
        assert local.doc_to_target(doc) == original.doc_to_target(doc)
        words = doc["text"].split(" ")
        assert local.doc_to_target(doc) == " " + words[-1]
    record = provenance["lambada_openai_local"]
    assert record["sources"][0]["sha256"] == LAMBADA_SHA256
    assert record["data_file"]["sha256"] == LAMBADA_SHA256


@pytest.mark.slow
def test_lambada_every_doc_renders_identically(lambada_pair):
    """All 5153 documents through both tasks' doc_to_text / doc_to_target (jinja: slow)."""
    original, local, _, _ = lambada_pair
    for doc in local.eval_docs.to_list():
        assert local.doc_to_text(doc) == original.doc_to_text(doc)
        assert local.doc_to_target(doc) == original.doc_to_target(doc)


def test_piqa_and_arc_easy_local_tasks(tmp_path):
    data_dir = _data_dir()
    manager, names, provenance = build_task_manager(
        ["piqa", "arc_easy"], data_dir=data_dir, cache_dir=tmp_path, offline=True
    )
    assert names == ["piqa_local", "arc_easy_local"]
    tasks = manager.load(names)["tasks"]
    piqa, arc = tasks["piqa_local"], tasks["arc_easy_local"]
    piqa_docs, arc_docs = piqa.eval_docs.to_list(), arc.eval_docs.to_list()
    assert len(piqa_docs) == 1838 == provenance["piqa_local"]["n_docs"]
    assert len(arc_docs) == 2376 == provenance["arc_easy_local"]["n_docs"]
    # Hand-checked rows (piqa_valid.jsonl + piqa_valid_labels.lst; mosaic arc_easy.jsonl).
    assert piqa.doc_to_text(piqa_docs[0]) == (
        "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    )
    assert "ripped paper strips" in piqa.doc_to_choice(piqa_docs[0])[0]
    assert [piqa.doc_to_target(piqa_docs[i]) for i in range(5)] == [0, 1, 1, 1, 0]
    assert piqa_docs[1]["goal"] == "dresser"
    assert arc.doc_to_text(arc_docs[0]) == (
        "Question: Which statement best explains why photosynthesis is the foundation of most "
        "food webs?\nAnswer:"
    )
    gold = [arc.doc_to_choice(arc_docs[i])[arc.doc_to_target(arc_docs[i])] for i in (0, 1, 3)]
    assert gold == [
        "Sunlight is the source of energy for nearly all ecosystems.",
        "breathing mask",
        "soft",
    ]
    assert provenance["arc_easy_local"]["sources"][0]["sha256"] == (
        "d2d12e59543acf9a5ef6079634a72b30215e36c2fd4236fff3bc855d287b87f5"
    )
    # Both run through QuambaLM as multiple-choice tasks.
    results = lm_eval.simple_evaluate(
        model=QuambaLM(TinyCausalLM(seed=3), ByteTokenizer(), batch_size=6),
        tasks=names,
        task_manager=manager,
        limit=6,
        log_samples=True,
        bootstrap_iters=0,
    )
    for name in names:
        assert 0.0 <= results["results"][name]["acc,none"] <= 1.0
        samples = results["samples"][name]
        assert len(samples) == 6
        assert all(len(s["resps"]) == len(s["arguments"]) >= 2 for s in samples)


def _write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_generic_hf_format_tasks_reuse_lm_eval_definitions(tmp_path):
    """arc_challenge, winogrande and hellaswag from user files in the Hugging Face format."""
    data = tmp_path / "data"
    data.mkdir()
    _write_jsonl(
        data / "arc_challenge_test.jsonl",
        [
            {
                "id": "a1",
                "question": "Which gas do plants take in?",
                "choices": {
                    "text": ["oxygen", "carbon dioxide", "helium"],
                    "label": ["A", "B", "C"],
                },
                "answerKey": "B",
            },
            {
                "id": "a2",
                "question": "What melts ice?",
                "choices": {
                    "text": ["heat", "cold", "dark", "wind"],
                    "label": ["1", "2", "3", "4"],
                },
                "answerKey": "1",
            },
        ],
    )
    _write_jsonl(
        data / "winogrande_validation.jsonl",
        [
            {
                "sentence": "The trophy did not fit in the case because the _ was too big.",
                "option1": "trophy",
                "option2": "case",
                "answer": 1,
            },
            {
                "sentence": "Ann thanked Beth because _ had helped a lot.",
                "option1": "Ann",
                "option2": "Beth",
                "answer": "2",
            },
        ],
    )
    _write_jsonl(
        data / "hellaswag_validation.jsonl",
        [
            {
                "ind": 4,
                "activity_label": "Baking cookies",
                "ctx_a": "A woman pours flour into a bowl.",
                "ctx_b": "she",
                "endings": ["stirs it [title] slowly.", "jumps.", "sings.", "sleeps."],
                "label": "0",
            }
        ],
    )
    names_in = ["arc_challenge", "winogrande", "hellaswag"]
    manager, names, provenance = build_task_manager(
        names_in, data_dir=data, cache_dir=tmp_path / "cache", offline=True
    )
    assert names == [n + "_local" for n in names_in]
    tasks = manager.load(names)["tasks"]

    arc = tasks["arc_challenge_local"]
    arc_docs = arc.eval_docs.to_list()
    assert [arc.doc_to_choice(d)[arc.doc_to_target(d)] for d in arc_docs] == [
        "carbon dioxide",
        "heat",
    ]
    assert arc.doc_to_text(arc_docs[0]) == "Question: Which gas do plants take in?\nAnswer:"

    wino = tasks["winogrande_local"]
    wino_docs = wino.eval_docs.to_list()
    assert provenance["winogrande_local"]["data_format"] == "winogrande-int-answer"
    assert [wino.doc_to_text(d) for d in wino_docs] == [0, 1]  # lm-eval: the gold option index
    assert wino.doc_to_choice(wino_docs[0]) == [
        "The trophy did not fit in the case because the trophy",
        "The trophy did not fit in the case because the case",
    ]
    assert wino.doc_to_target(wino_docs[1]) == "had helped a lot."

    hella = tasks["hellaswag_local"]
    (hella_doc,) = hella.eval_docs.to_list()
    assert hella.doc_to_text(hella_doc) == "Baking cookies: A woman pours flour into a bowl. She"
    assert hella.doc_to_choice(hella_doc)[0] == "stirs it. slowly."
    assert hella.doc_to_target(hella_doc) == 0
    for name in names:
        assert Path(provenance[name]["task_yaml"]).is_file()
        assert len(provenance[name]["data_file"]["sha256"]) == 64


def test_missing_data_offline_says_which_file_to_provide(tmp_path, monkeypatch):
    monkeypatch.delenv("QUAMBA_DATA_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match=r"piqa_validation\.jsonl.*--data-dir"):
        build_task_manager(["piqa"], data_dir=tmp_path, cache_dir=tmp_path, offline=True)
    with pytest.raises(FileNotFoundError, match=r"lambada_test\.jsonl.*no --data-dir was given"):
        build_task_manager(["lambada_openai_local"], cache_dir=tmp_path, offline=False)
    with pytest.raises(ValueError, match="no local variant"):
        build_task_manager(["mmlu"], data_dir=tmp_path, cache_dir=tmp_path, offline=True)
    with pytest.raises(ValueError, match="non-empty list"):
        build_task_manager([], cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        build_task_manager(["piqa"], data_dir=tmp_path / "absent", cache_dir=tmp_path)


def test_bad_local_files_give_clear_errors(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _write_jsonl(data / "piqa_valid.jsonl", [{"goal": "g", "sol1": "a", "sol2": "b"}] * 3)
    (data / "piqa_valid_labels.lst").write_text("0\n1\n", encoding="utf-8")
    with pytest.raises(ValueError, match="2 labels for 3 rows"):
        build_task_manager(["piqa"], data_dir=data, cache_dir=tmp_path, offline=True)
    _write_jsonl(
        data / "arc_easy_test.jsonl", [{"query": "Question: q", "choices": ["a", "b"], "gold": 2}]
    )
    with pytest.raises(ValueError, match="gold=2"):
        build_task_manager(["arc_easy"], data_dir=data, cache_dir=tmp_path, offline=True)
    _write_jsonl(data / "hellaswag_val.jsonl", [{"ctx_a": "x", "label": 0}])
    with pytest.raises(ValueError, match="lacks fields"):
        build_task_manager(["hellaswag"], data_dir=data, cache_dir=tmp_path, offline=True)


def test_offline_mode_sets_and_restores_flags(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    before = (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE)
    with offline_mode():
        assert os.environ["HF_HUB_OFFLINE"] == os.environ["HF_DATASETS_OFFLINE"] == "1"
        assert datasets.config.HF_HUB_OFFLINE is True
        assert huggingface_hub.constants.HF_HUB_OFFLINE is True
    assert "HF_HUB_OFFLINE" not in os.environ
    assert os.environ["HF_DATASETS_OFFLINE"] == "0"
    assert before == (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE)

"""Perplexity of FP32, naive static W8A8 and the Quamba recipe on the bundled tiny model.

    uv run python tools/ppl_table.py --data-dir ../shared/data

Texts: the built-in task's evaluation documents (project-generated) and WikiText-2 raw test
(``corpora/wikitext2_raw_test_noblank.txt`` from --data-dir, its first --wiki-bytes bytes).
Calibration for both recipes: the same 32 x 256 tokens of project-generated training text.
Quantized models run Mode 0. Prints a markdown table (the one in packages/quamba-layers/README.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from quamba_eval import builtin_task
from quamba_eval.models import CalibrationChoice, bundled_model_dir, calibration_for
from quamba_eval.perplexity import perplexity_on_text
from quamba_layers import load_model, load_tokenizer
from quamba_layers.quant import get_recipe, quantize


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--wiki-bytes", type=int, default=60_000)
    parser.add_argument("--window", type=int, default=512)
    args = parser.parse_args()
    torch.manual_seed(0)
    directory = bundled_model_dir()
    model = load_model(directory)
    tokenizer = load_tokenizer(directory)
    texts = {
        "built-in task (500 docs)": "\n".join(d["text"] for d in builtin_task.generate_documents())
    }
    wiki = args.data_dir / "corpora" / "wikitext2_raw_test_noblank.txt"
    if wiki.is_file():
        texts["WikiText-2 test"] = wiki.read_text(encoding="utf-8")[: args.wiki_bytes]
    choice = CalibrationChoice(num_samples=32, seq_len=256)
    calib = calibration_for(choice, tokenizer, None)
    models = {"FP32": model}
    for name in ("naive", "quamba"):
        recipe = get_recipe(name).with_calibration(32, 256)
        models[f"W8A8 {name}"] = quantize(model, calib, recipe, progress=False)
    print("| model | " + " | ".join(f"{t}: ppl / bits per byte" for t in texts) + " |")
    print("|---|" + "---|" * len(texts))
    for label, m in models.items():
        cells = []
        for text in texts.values():
            r = perplexity_on_text(m, tokenizer, text, max_length=args.window, batch_size=16)
            cells.append(f"{r['perplexity']:.4f} / {r['bits_per_byte']:.4f}")
        print(f"| {label} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

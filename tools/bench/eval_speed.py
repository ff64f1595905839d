"""Time a full lambada_openai evaluation (5153 documents) of a 130m-shaped random W8A8 model in
Mode 0 and in each simulation mode, on the GPU, side by side in one run (--repeats passes per
mode, round-robin; the median is reported, every pass is in the JSON).

    python tools/bench/eval_speed.py --data lambada_test.jsonl --tokenizer tokenizer.json

The scoring is lm-eval's lambada_openai (context = text minus its last word, target = " " + last
word; log-likelihood of the target and whether it is the greedy continuation), batched by length
with right padding, as quamba_eval.lm.QuambaLM does (that class needs lm-eval, which the GPU
machine lacks). Prints a table and writes JSON to $OUT if set.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
for package in ("quamba-layers", "quamba-modes"):
    sys.path.insert(0, str(ROOT / "packages" / package / "src"))

from bench_kernels import write_result  # noqa: E402  (beside this file)

from quamba_layers.config import MambaConfig  # noqa: E402
from quamba_layers.model import MambaLM  # noqa: E402
from quamba_layers.quant import CalibrationSet, quantize, select_backend  # noqa: E402
from quamba_layers.tokenizer import load_tokenizer  # noqa: E402
from quamba_modes import resolve_mode  # noqa: E402


def requests(path: Path, tokenizer):
    out = []
    for line in path.read_text().splitlines():
        text = json.loads(line)["text"]
        context, word = text.rsplit(" ", 1)
        out.append((tokenizer.encode(context), tokenizer.encode(" " + word)))
    return out


@torch.no_grad()
def evaluate(model, reqs, batch_size: int, device) -> tuple[float, float]:
    order = sorted(range(len(reqs)), key=lambda i: -(len(reqs[i][0]) + len(reqs[i][1])))
    correct, loglik = 0, 0.0
    for start in range(0, len(order), batch_size):
        batch = [reqs[i] for i in order[start : start + batch_size]]
        seqs = [(c + t)[:-1] for c, t in batch]
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, : len(s)] = torch.tensor(s)
        lens = torch.tensor([len(s) for s in seqs])
        logits = model(ids.to(device), seq_lens=lens.to(device)).logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)
        for row, (context, target) in enumerate(batch):
            positions = torch.arange(
                len(context) - 1, len(context) - 1 + len(target), device=device
            )
            tgt = torch.tensor(target, device=device)
            loglik += logprobs[row, positions, tgt].sum().item()
            correct += bool((logits[row, positions].argmax(-1) == tgt).all())
    return correct / len(reqs), loglik / len(reqs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--modes", default="0,2-0,2-1,2-2,2-3,2-4,3")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--n-layer", type=int, default=24)
    parser.add_argument("--limit", type=int)
    parser.add_argument("--repeats", type=int, default=3, help="passes per mode (median)")
    args = parser.parse_args()
    device = torch.device("cuda")
    tokenizer = load_tokenizer(args.tokenizer)
    reqs = requests(args.data, tokenizer)[: args.limit]
    model = MambaLM(MambaConfig(d_model=768, n_layer=args.n_layer, vocab_size=50277), seed=0).eval()
    calib = CalibrationSet(torch.tensor([r[0][:64] for r in reqs if len(r[0]) >= 64][:16]))
    qmodel = quantize(model, calib, progress=False, device=device).to(device)
    backend = select_backend(device, "kernel")
    modes = args.modes.split(",")
    implementations = backend.implementations()
    resolved = {
        mode: resolve_mode(
            mode, device="cuda", kernels_available=True, backend_implementations=implementations
        )
        for mode in modes
    }
    # Round-robin repeats, median per mode: one pass per mode moved by up to ~30% between runs
    # (the loop is partly host-bound), which decided whether a mode was within 1.5x of Mode 0.
    runs = {mode: [] for mode in modes}
    scores = {}
    for _ in range(args.repeats):
        for mode in modes:
            qmodel.set_datapath(resolved[mode].datapath, backend)
            evaluate(qmodel, reqs[: args.batch_size], args.batch_size, device)  # warm-up
            torch.cuda.synchronize()
            started = time.perf_counter()
            scores[mode] = evaluate(qmodel, reqs, args.batch_size, device)
            torch.cuda.synchronize()
            runs[mode].append(time.perf_counter() - started)
    rows = []
    for mode in modes:
        acc, ll = scores[mode]
        rows.append({"mode": mode, "seconds": statistics.median(runs[mode]), "runs": runs[mode],
                     "acc": acc, "mean_loglik": ll,
                     "ssm": resolved[mode].implementations["ssm"]})  # fmt: skip
    base = rows[0]["seconds"]
    print(f"lambada_openai ({len(reqs)} docs), 130m-shaped random W8A8 ({args.n_layer} layers), "
          f"batch {args.batch_size}, {torch.cuda.get_device_name()}, median of {args.repeats} "
          f"round-robin passes")  # fmt: skip
    print(f"{'mode':6} {'seconds':>8} {'vs mode 0':>9}  ssm implementation")
    for r in rows:
        print(f"{r['mode']:6} {r['seconds']:8.2f} {r['seconds'] / base:9.2f}x  {r['ssm']}")
    payload = {"kind": "eval_speed", "device": torch.cuda.get_device_name(),
               "documents": len(reqs), "batch_size": args.batch_size, "n_layer": args.n_layer,
               "repeats": args.repeats, "torch": torch.__version__, "rows": rows}  # fmt: skip
    write_result(payload, "eval_speed.json", None)  # to $OUT when set
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

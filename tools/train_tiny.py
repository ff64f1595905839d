"""Train the bundled tiny Mamba-1 (byte-level) on public-domain corpora and the built-in task text.

    python tools/train_tiny.py --data-dir ../shared/data --out OUT_DIR --device cuda

Data: documents from quamba_eval.builtin_task.training_documents (a seed stream disjoint from the
evaluation set) and two public-domain books from ``<data-dir>/corpora`` (tinyshakespeare,
War and Peace; their last 5 % is held out). Nothing fetched is written into the output: only the
weights (float16 safetensors, mamba_ssm layout), the byte tokenizer description, the loss log and
the training record.

The training forward uses the model's own parameters and algebra, but runs the selective scan as a
log-depth associative scan (Hillis-Steele doubling over (a, b) pairs) instead of the sequential
reference loop, which is launch-bound on a GPU. After training, the held-out loss is computed
with the real ``MambaLM`` forward (the sequential reference scan) and must agree with the training
forward: that check is recorded.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
for package in ("quamba-layers", "quamba-eval"):
    sys.path.insert(0, str(ROOT / "packages" / package / "src"))

from quamba_eval.builtin_task import training_documents  # noqa: E402
from quamba_layers.config import MambaConfig  # noqa: E402
from quamba_layers.loading import save_model  # noqa: E402
from quamba_layers.model import MambaLM  # noqa: E402
from quamba_layers.tokenizer import ByteTokenizer  # noqa: E402

CORPORA = ("tinyshakespeare.txt", "war_and_peace.txt")
EOS = ByteTokenizer.eos_token_id


def parallel_scan(u, delta_raw, A, B, C, D, delta_bias):
    """The selective scan (softplus, D skip, no gate) by doubling: y (B, L, E) float32."""
    delta = F.softplus(delta_raw.float() + delta_bias.float()[:, None])
    a = torch.exp(delta[:, :, None, :] * A[None, :, :, None])  # (B, E, N, L)
    b = delta[:, :, None, :] * B.float()[:, None, :, :] * u.float()[:, :, None, :]
    length = u.shape[-1]
    step = 1
    while step < length:
        b = torch.cat([b[..., :step], b[..., step:] + a[..., step:] * b[..., :-step]], dim=-1)
        a = torch.cat([a[..., :step], a[..., step:] * a[..., :-step]], dim=-1)
        step *= 2
    y = (b * C.float()[:, None, :, :]).sum(dim=2) + u.float() * D.float()[:, None]
    return y.transpose(1, 2)


def train_forward(model: MambaLM, ids: torch.Tensor) -> torch.Tensor:
    """Logits of ``model`` on ``ids`` with the parallel scan (differentiable)."""
    hidden = model.backbone.embedding(ids)
    residual = None
    for block in model.backbone.layers:
        residual = block.add_residual(hidden, residual)
        mixer = block.mixer
        x, z = mixer.project_in(block.norm(residual))
        k = mixer.d_conv
        u = F.conv1d(x, mixer.conv1d.weight, mixer.conv1d.bias, padding=k - 1, groups=x.shape[1])
        u = F.silu(u[..., : x.shape[-1]])
        dt_low, b, c = mixer.project_x(u)
        delta_raw = mixer.project_dt(dt_low)
        y = parallel_scan(u, delta_raw, mixer.A(), b, c, mixer.D, mixer.dt_proj.bias)
        hidden = mixer.project_out(mixer.gate(y, z))
    residual = residual + hidden
    return model.lm_head(model.backbone.norm_f(residual))


def byte_stream(texts: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for text in texts:
        ids.extend(text.encode("utf-8"))
        ids.append(EOS)
    return torch.tensor(ids, dtype=torch.int64)


def sample_rows(
    stream: torch.Tensor, rows: int, length: int, rng: torch.Generator, starts=None
) -> torch.Tensor:
    """Random windows of length+1; with ``starts``, windows begin at one of those positions."""
    if starts is None:
        picked = torch.randint(0, stream.numel() - length - 1, (rows,), generator=rng)
    else:
        picked = starts[torch.randint(0, starts.numel(), (rows,), generator=rng)]
    return torch.stack([stream[s : s + length + 1] for s in picked.tolist()])


def document_starts(stream: torch.Tensor, length: int) -> torch.Tensor:
    """Positions right after an end-of-text id (and 0) with a full window after them."""
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), (stream == EOS).nonzero()[:, 0] + 1])
    return starts[starts < stream.numel() - length - 1]


def batch_loss(logits: torch.Tensor, rows: torch.Tensor, vocab: int) -> torch.Tensor:
    return F.cross_entropy(logits[:, :, :vocab].reshape(-1, vocab), rows[:, 1:].reshape(-1))


@torch.no_grad()
def held_out_loss(model, rows: torch.Tensor, vocab: int, device, reference: bool, batch: int = 16):
    total, count = 0.0, 0
    for start in range(0, rows.shape[0], batch):
        chunk = rows[start : start + batch].to(device)
        logits = model(chunk[:, :-1]).logits if reference else train_forward(model, chunk[:, :-1])
        loss = F.cross_entropy(
            logits[:, :, :vocab].reshape(-1, vocab).float(),
            chunk[:, 1:].reshape(-1),
            reduction="sum",
        )
        total += loss.item()
        count += chunk[:, 1:].numel()
    return total / count


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--data-dir", type=Path, required=True, help="holds corpora/ (see SOURCES.md)"
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2500)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--task-fraction", type=float, default=0.75, help="rows from the task text")
    parser.add_argument("--train-docs", type=int, default=60000)
    parser.add_argument("--max-minutes", type=float, default=8.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init", type=Path, help="start from these weights (a saved tiny model)")
    args = parser.parse_args(argv)

    corpora_dir = args.data_dir / "corpora"
    missing = [name for name in CORPORA if not (corpora_dir / name).is_file()]
    if missing:
        raise SystemExit(
            f"train_tiny: {missing} not found in {corpora_dir} (see ../shared/data/SOURCES.md)"
        )
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    device = torch.device(args.device)
    rng = torch.Generator().manual_seed(args.seed)

    task_train = byte_stream(training_documents(args.train_docs, seed=args.seed))
    # Task windows start at a document start, so the entity to recall is inside the window.
    task_starts = document_starts(task_train, args.seq_len)
    task_held = byte_stream(training_documents(2000, seed=args.seed + 1000))
    corpus_train, corpus_held = [], []
    for name in CORPORA:
        text = (corpora_dir / name).read_text(encoding="utf-8", errors="replace")
        cut = int(len(text) * 0.95)
        corpus_train.append(text[:cut])
        corpus_held.append(text[cut:])
    corpus_train_stream, corpus_held_stream = byte_stream(corpus_train), byte_stream(corpus_held)

    config = MambaConfig(
        d_model=args.d_model, n_layer=args.n_layer, vocab_size=ByteTokenizer.vocab_size
    )
    model = MambaLM(config, seed=args.seed).to(device)
    if args.init is not None:
        from quamba_layers.loading import load_model

        model = load_model(args.init, dtype=torch.float32).to(device)
        print(f"initialised from {args.init}")
    vocab = config.vocab_size
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: d_model={config.d_model} n_layer={config.n_layer} params={n_params / 1e6:.2f}M")

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "A_log" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "A_log" in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    warmup = max(1, args.steps // 25)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    task_rows = round(args.batch * args.task_fraction)
    log = []
    started = time.time()
    model.train()
    bar = tqdm(range(args.steps), desc="training", unit="step")
    for step in bar:
        rows = torch.cat(
            [
                sample_rows(task_train, task_rows, args.seq_len, rng, task_starts),
                sample_rows(corpus_train_stream, args.batch - task_rows, args.seq_len, rng),
            ]
        ).to(device)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        loss = batch_loss(train_forward(model, rows[:, :-1]), rows, vocab)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 25 == 0 or step == args.steps - 1:
            log.append({"step": step, "loss": round(loss.item(), 5), "lr": lr_at(step)})
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if (time.time() - started) / 60 > args.max_minutes:
            print(f"stopping at step {step}: --max-minutes {args.max_minutes} reached")
            break
    train_seconds = time.time() - started

    model.eval()
    held_rng = torch.Generator().manual_seed(args.seed + 7)
    held = {
        "task": sample_rows(task_held, 64, args.seq_len, held_rng),
        "corpus": sample_rows(corpus_held_stream, 64, args.seq_len, held_rng),
    }
    results = {}
    for name, rows in held.items():
        parallel = held_out_loss(model, rows, vocab, device, reference=False)
        reference = held_out_loss(model, rows[:8], vocab, device, reference=True)
        parallel_subset = held_out_loss(model, rows[:8], vocab, device, reference=False)
        results[name] = {
            "loss_nats_per_byte": parallel,
            "bits_per_byte": parallel / math.log(2),
            "reference_forward_check": {"reference": reference, "parallel": parallel_subset},
        }
        if abs(reference - parallel_subset) > 1e-3 * max(1.0, parallel_subset):
            raise SystemExit(f"training forward and MambaLM disagree on {name}: {results[name]}")
        print(f"held-out {name}: {parallel:.4f} nats/byte ({parallel / math.log(2):.3f} bits/byte)")

    args.out.mkdir(parents=True, exist_ok=True)
    model = model.to("cpu", torch.float16)
    save_model(model, args.out, layout="mamba_ssm", safetensors=True)
    ByteTokenizer().save(args.out)
    record = {
        "config": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k not in ("data_dir", "out")
        },
        "params": n_params,
        "train_seconds": round(train_seconds, 1),
        "steps_done": log[-1]["step"] + 1,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "held_out": results,
        "corpora_sha256": {name: sha256_file(corpora_dir / name) for name in CORPORA},
        "task_text": "quamba_eval.builtin_task.training_documents (seed stream disjoint from eval)",
        "loss_log": log,
    }
    (args.out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(
        json.dumps(
            {k: record[k] for k in ("params", "train_seconds", "steps_done", "held_out")}, indent=2
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

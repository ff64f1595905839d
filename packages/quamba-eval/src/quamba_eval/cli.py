"""quamba-eval: evaluate precision modes of quantized Mamba, compare layers, quantize, list modes.

quamba-eval [--mode 2-4] [--model PATH] [--tasks builtin_recall] ...   evaluate (default)
quamba-eval modes [--json]                                            the mode table
quamba-eval compare --mode all --reference fp32 [--stages] [--save DIR]
quamba-eval compare --saved A.safetensors B.safetensors
quamba-eval quantize --model FP_CHECKPOINT --output DIR [--recipe quamba]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

SUBCOMMANDS = ("run", "modes", "compare", "quantize")
DEFAULT_TASK = "builtin_recall"
TESTING_LIMIT = 100


class UsageError(Exception):
    """A problem with what the user asked for; printed without a traceback."""


def _default_data_dir() -> Path | None:
    env = os.environ.get("QUAMBA_DATA_DIR")
    if env:
        return Path(env)
    return None


def _common_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", help="checkpoint dir or hub id (default: the bundled tiny model)")
    g.add_argument("--float-model", help="float checkpoint for the fp32/fp16 references")
    g.add_argument("--tokenizer", help="tokenizer.json, a directory holding it, or a hub id")
    g.add_argument("--recipe", default="quamba", help="PTQ recipe for float models (quamba, naive)")
    g.add_argument("--alpha", type=float, help="percentile alpha (default: the recipe's, 0.9995)")
    g.add_argument(
        "--calib-data",
        default="builtin",
        help="calibration text: 'builtin' (generated), a .txt/.jsonl file, or hf:<dataset>",
    )
    g.add_argument("--calib-samples", type=int, default=32)
    g.add_argument("--calib-len", type=int, default=256)
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    g.add_argument("--data-dir", type=Path, default=_default_data_dir(), help="local task data")
    g.add_argument("--seed", type=int, default=1234)


def _mode_args(p: argparse.ArgumentParser, default_mode: str | None) -> None:
    g = p.add_argument_group("modes")
    g.add_argument("--mode", default=default_mode, help="mode name, a comma list, or 'all'")
    g.add_argument("--reference", default="fp32", help="reference mode (fp32, fp16 or a mode)")
    g.add_argument("--rounding", choices=("half_even", "half_away"), help="all rounding sites")
    g.add_argument(
        "--ssm-impl", choices=("reference", "kernel"), help="force an SSM implementation"
    )
    g.add_argument(
        "--backend",
        choices=("auto", "reference", "kernel"),
        default="auto",
        help="ops implementation: kernels on CUDA when available (auto), or forced",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quamba-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = parser.add_subparsers(dest="command")

    run = sub.add_parser("run", help="evaluate modes on tasks (the default command)")
    _common_model_args(run)
    _mode_args(run, None)
    g = run.add_argument_group("evaluation")
    g.add_argument("--tasks", default=DEFAULT_TASK, help="comma list; ppl:FILE for perplexity")
    g.add_argument("--limit", type=int, help="documents per task")
    g.add_argument("--testing", action="store_true", help="the seed system's 100 documents")
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--max-length", type=int, default=2048)
    g.add_argument("--output", type=Path, help="write results.json, report.md, samples")
    g.add_argument("--fidelity-docs", type=int, default=32, help="documents for KL/top-1 (0: off)")
    g.add_argument(
        "--builtin-docs",
        type=int,
        default=300,
        help="size of the generated builtin_recall task (keeps the default run under a minute)",
    )

    modes = sub.add_parser("modes", help="print the table of modes")
    modes.add_argument("--json", action="store_true", help="the mode descriptions as JSON")

    compare = sub.add_parser("compare", help="layer-by-layer comparison against a reference")
    _common_model_args(compare)
    _mode_args(compare, "all")
    g = compare.add_argument_group("comparison")
    g.add_argument("--stages", action="store_true", help="also conv out, SSM in/out, out_proj in")
    g.add_argument("--text", help="text file to run (default: generated task text)")
    g.add_argument("--windows", type=int, default=4)
    g.add_argument("--window-len", type=int, default=128)
    g.add_argument("--batch-size", type=int, default=2)
    g.add_argument("--save", type=Path, help="also write every captured tensor (safetensors)")
    g.add_argument(
        "--saved", nargs=2, type=Path, metavar=("REF", "OTHER"), help="compare saved runs"
    )
    g.add_argument("--output", type=Path, default=Path("compare-out"))

    quant = sub.add_parser("quantize", help="quantize a float checkpoint and write it")
    _common_model_args(quant)
    quant.add_argument("--output", type=Path, required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in (*SUBCOMMANDS, "-h", "--help"):
        argv = ["run", *argv]
    args = build_parser().parse_args(argv)
    try:
        if args.command == "modes":
            return cmd_modes(args)
        if args.command == "compare":
            return cmd_compare(args)
        if args.command == "quantize":
            return cmd_quantize(args)
        return cmd_run(args)
    except UsageError as exc:
        print(f"quamba-eval: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        # Every library error here carries a message meant for the user.
        print(f"quamba-eval: error: {exc}", file=sys.stderr)
        return 2


# -- modes ----------------------------------------------------------------------------------
def cmd_modes(args) -> int:
    from quamba_modes import modes_json, modes_table

    print(modes_json() if args.json else modes_table())
    return 0


# -- shared ---------------------------------------------------------------------------------
def _resolve_modes(args, *, include_reference: bool = True):
    """(reference name, [(Mode, ResolvedMode)], backend) with legacy env vars honoured."""
    import torch

    from quamba_layers.quant import kernels_status, select_backend
    from quamba_modes import check_against_cli, get_mode, parse_modes, resolve_mode

    if args.mode is not None and ("," in args.mode or args.mode.strip().lower() == "all"):
        # A list: the legacy variables may only name one of its modes.
        listed = [m.name for m in parse_modes(args.mode)]
        env_mode, warning = check_against_cli(None, os.environ)
        if env_mode is not None and env_mode not in listed:
            raise UsageError(
                f"--mode {args.mode} does not include mode {env_mode}, which the seed-system "
                "environment variables select; unset them or add it to --mode"
            )
        name = args.mode
    else:
        name, warning = check_against_cli(args.mode, os.environ, default="0")
    if warning:
        print(f"quamba-eval: warning: {warning}", file=sys.stderr)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            f"--device {args.device}: no CUDA GPU is available here (use --device cpu)"
        )
    backend = select_backend(device, args.backend)
    usable, reason = kernels_status()
    modes = list(parse_modes(name))
    reference = get_mode(args.reference)
    names = [m.name for m in modes]
    if include_reference and reference.name not in names:
        modes.insert(0, reference)
    resolved = []
    for mode in modes:
        overrides = {}
        if mode.datapath is not None:
            overrides = {"rounding": args.rounding, "ssm_impl": args.ssm_impl}
        resolved.append(
            (
                mode,
                resolve_mode(
                    mode.name,
                    device=str(device),
                    kernels_available=usable and device.type == "cuda",
                    kernels_reason=reason,
                    backend_implementations=backend.implementations(),
                    **overrides,
                ),
            )
        )
    return reference.name, resolved, backend, device


def _load(args, need_quantized: bool = True):
    from quamba_eval.models import CalibrationChoice, load_models

    choice = CalibrationChoice(
        source=args.calib_data,
        num_samples=args.calib_samples,
        seq_len=args.calib_len,
        recipe=args.recipe,
        alpha=args.alpha,
    )
    return load_models(
        args.model,
        calibration=choice,
        data_dir=args.data_dir,
        tokenizer_arg=args.tokenizer,
        float_model_arg=args.float_model,
        need_quantized=need_quantized,
    )


# -- run ------------------------------------------------------------------------------------
def cmd_run(args) -> int:
    from quamba_eval import report, runner
    from quamba_eval.tasks import build_task_manager

    started = time.perf_counter()
    runner.set_determinism(args.seed)
    runner.prepare_lm_eval()
    reference, resolved, backend, device = _resolve_modes(args)
    limit = args.limit
    run_warnings = []
    if args.testing:
        if limit is not None and limit != TESTING_LIMIT:
            raise UsageError("--testing means --limit 100; give one or the other")
        limit = TESTING_LIMIT
        run_warnings.append(
            "--testing evaluates 100 documents per task: an accuracy has a standard error of "
            "about 5 points, so differences of a few documents between modes are noise"
        )
    for _, r in resolved:
        print(r.describe())
        print()
    need_quantized = any(mode.datapath is not None for mode, _ in resolved)
    bundle = _load(args, need_quantized=need_quantized)
    print(f"model: {bundle.identity.get('model')} ({bundle.identity.get('kind')})")
    if "quantized_on_the_fly" in bundle.identity:
        q = bundle.identity["quantized_on_the_fly"]
        rec, cal = q["recipe"], q["calibration"]
        print(
            f"quantized on the fly: recipe {rec['name']} (hadamard={rec['hadamard']}, "
            f"alpha={rec['percentile_alpha']}), calibration {cal['num_samples']} x "
            f"{cal['seq_len']} tokens from {cal.get('kind')}"
        )

    task_names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    ppl_files = [t.removeprefix("ppl:") for t in task_names if t.startswith("ppl:")]
    lm_tasks = [t for t in task_names if not t.startswith("ppl:")]
    task_manager, resolved_tasks, data_provenance = (None, [], {})
    if lm_tasks:
        task_manager, resolved_tasks, data_provenance = build_task_manager(
            lm_tasks, args.data_dir, builtin_n_docs=args.builtin_docs
        )

    run = runner.Run(reference=reference, tasks=resolved_tasks, limit=limit, warnings=run_warnings)
    run.provenance = runner.provenance(
        {k: str(v) for k, v in vars(args).items()}, bundle.identity, device, args.seed
    )
    run.provenance["task_data"] = data_provenance
    run.provenance["backend"] = backend.implementations()
    fidelity_texts = _fidelity_texts(task_manager, resolved_tasks, args.fidelity_docs)
    reference_model = None
    for mode, r in resolved:
        model = runner.model_for(mode, bundle, device, r, backend)
        description = r.to_dict()
        if mode.kind == "float":
            description["implementations"] = model.implementations()
        result = runner.ModeResult(mode.name, description, {}, {}, 0.0)
        if resolved_tasks:
            result = runner.evaluate_mode(
                mode.name, description, model, bundle.tokenizer, task_manager, resolved_tasks,
                limit=limit, batch_size=args.batch_size, seed=args.seed, device=device,
                max_length=args.max_length,
            )  # fmt: skip
        if ppl_files:
            from quamba_eval.perplexity import perplexity_on_text

            result.lm_eval.setdefault("perplexity_files", {})
            for path in ppl_files:
                result.lm_eval["perplexity_files"][path] = perplexity_on_text(
                    model, bundle.tokenizer, path, max_length=args.max_length,
                    batch_size=args.batch_size, device=device,
                )  # fmt: skip
        if mode.name == reference:
            reference_model = model
        elif fidelity_texts and reference_model is not None:
            from quamba_eval.fidelity import fidelity

            result.fidelity = fidelity(
                reference_model, model, bundle.tokenizer, fidelity_texts,
                max_length=args.max_length, batch_size=args.batch_size, device=device,
                ref_device=device,
            )  # fmt: skip
        run.modes.append(result)
        print(f"mode {mode.name}: done in {result.seconds:.1f} s")
        if mode.name == reference and mode.kind == "float" and mode.float_dtype == "float16":
            reference_model = model

    summary = runner.summarize(run) if resolved_tasks else {"metrics": {}, "comparisons": {}}
    _add_power_warnings(run, summary)
    report.print_table(run, summary)
    for path in ppl_files:
        for mode in run.modes:
            ppl = mode.lm_eval["perplexity_files"][path]
            print(f"perplexity {path} [{mode.name}]: {ppl.get('perplexity'):.4f}")
    if args.output:
        paths = runner.write_outputs(run, summary, report.markdown(run, summary), args.output)
        print(f"wrote {paths[0]} and {len(paths) - 1} more files to {args.output}")
    print(f"total time {time.perf_counter() - started:.1f} s on {run.provenance['device']}")
    return 0


def _fidelity_texts(task_manager, tasks, n_docs: int) -> list[str]:
    """The first documents of the first task (context and target), for KL / top-1 agreement."""
    if n_docs <= 0 or not tasks:
        return []
    task = task_manager.load([tasks[0]])["tasks"][tasks[0]]
    docs = task.test_docs() if task.has_test_docs() else task.validation_docs()
    texts = []
    for doc in docs:
        target = task.doc_to_target(doc)
        if not isinstance(target, str):
            continue  # multiple-choice targets are indices; use the context alone
        texts.append(task.doc_to_text(doc) + target)
        if len(texts) >= n_docs:
            break
    return texts


def _add_power_warnings(run, summary: dict) -> None:
    for mode, per_task in summary.get("comparisons", {}).items():
        for task, comparison in per_task.items():
            for metric, c in comparison.items():
                warning = c.get("power_warning") if isinstance(c, dict) else None
                if warning:
                    run.warnings.append(f"{mode} {task} {metric}: {warning}")


# -- compare --------------------------------------------------------------------------------
def cmd_compare(args) -> int:
    from quamba_eval import compare, runner

    runner.set_determinism(args.seed)
    if args.saved:
        result = compare.compare_saved(*args.saved)
        paths = compare.write_outputs(result, args.output)
        print(compare.markdown_table(result))
        print(f"wrote {', '.join(str(p) for p in paths.values())}")
        return 0
    reference, resolved, backend, device = _resolve_modes(args)
    bundle = _load(args, need_quantized=True)
    windows = _compare_windows(args, bundle.tokenizer)

    def capture_for(mode, r):
        if mode.kind == "float":
            # Stage capture patches the reference stage methods: keep the reference path.
            model = runner.model_for(mode, bundle, device, r, backend).use_kernels("reference")
            online = bundle.quantized.cfg.online_hadamard if bundle.quantized is not None else True
            return lambda t: compare.capture_float(model, t.to(device), args.stages, online)

        def capture(tokens):
            qmodel = bundle.quantized.to(device)
            qmodel.set_datapath(r.datapath, backend)
            return compare.capture_quantized(qmodel, tokens.to(device), args.stages)

        return capture

    captures = {mode.name: capture_for(mode, r) for mode, r in resolved}
    reference_capture = captures.pop(reference)
    writer = compare.CaptureWriter(args.save) if args.save else None
    result = compare.compare_layers(reference_capture, captures, windows, reference, save=writer)
    result.provenance = {
        "model": bundle.identity,
        "modes": {mode.name: r.to_dict() for mode, r in resolved},
        "windows": len(windows),
        "window_len": args.window_len,
    }
    if writer is not None:
        files = writer.close(result.provenance)
        print(f"saved tensors: {', '.join(str(f) for f in files)}")
    paths = compare.write_outputs(result, args.output)
    print(compare.markdown_table(result))
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


def _compare_windows(args, tokenizer):
    import torch

    from quamba_eval import builtin_task

    if args.text:
        text = Path(args.text).read_text(encoding="utf-8")
    else:
        text = "\n".join(builtin_task.training_documents(200, seed=99))
    ids = tokenizer.encode(text)
    per_batch = args.window_len * args.batch_size
    needed = per_batch * args.windows
    if len(ids) < needed:
        raise UsageError(
            f"the text has {len(ids)} tokens, fewer than --windows {args.windows} x --batch-size "
            f"{args.batch_size} x --window-len {args.window_len} = {needed}"
        )
    tokens = torch.tensor(ids[:needed], dtype=torch.long)
    return [w.reshape(args.batch_size, args.window_len) for w in tokens.split(per_batch)]


# -- quantize -------------------------------------------------------------------------------
def _save_tokenizer(tokenizer, directory: Path) -> None:
    """Keep the tokenizer next to the checkpoint so it evaluates offline."""
    from quamba_layers.io_utils import atomic_write

    if hasattr(tokenizer, "save"):
        tokenizer.save(directory)
    elif hasattr(tokenizer, "tokenizer"):  # HFTokenizer wraps tokenizers.Tokenizer
        atomic_write(directory / "tokenizer.json", lambda tmp: tokenizer.tokenizer.save(tmp))


def cmd_quantize(args) -> int:
    from quamba_layers.quant import save_quantized

    if args.model is None:
        raise UsageError("quantize needs --model (a float Mamba-1 checkpoint or hub id)")
    bundle = _load(args, need_quantized=True)
    if bundle.quantized is None:
        raise UsageError(f"{args.model} is not a float checkpoint")
    out = save_quantized(bundle.quantized, args.output)
    _save_tokenizer(bundle.tokenizer, out)
    print(f"wrote W8A8 checkpoint {out} (recipe {args.recipe}) with its tokenizer")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Readable summaries of a run: a terminal table (rich) and a markdown report."""

from __future__ import annotations

import json

from quamba_eval.runner import Run


def _fmt_metric(metric: str, s: dict) -> str:
    if metric == "perplexity":
        return f"{s['perplexity']:.4g} [{s['ci_low']:.4g}, {s['ci_high']:.4g}]"
    return f"{100 * s['mean']:.2f}% ± {100 * s['stderr']:.2f} [{100 * s['ci_low']:.1f}, {100 * s['ci_high']:.1f}]"


def rows(run: Run, summary: dict) -> list[list[str]]:
    """[task, metric, mode, value, vs reference, verdict] rows."""
    out = []
    for task in run.tasks:
        for mode in run.modes:
            per_metric = summary["metrics"][mode.name].get(task, {})
            for metric, s in per_metric.items():
                versus, verdict = "reference", ""
                if mode.name != run.reference:
                    comparison = summary["comparisons"].get(mode.name, {}).get(task, {})
                    key = metric if metric != "perplexity" else "loglikelihood"
                    c = comparison.get(key)
                    if c is not None and metric != "perplexity":
                        versus = (
                            f"{100 * c['difference']:+.2f} pts [{100 * c['ci_low']:+.1f}, "
                            f"{100 * c['ci_high']:+.1f}], McNemar p={c['p_value']:.3g}"
                        )
                        verdict = c["verdict"]
                    elif c is not None:
                        versus = (
                            f"ppl ratio {c['perplexity_ratio']:.4f}, Wilcoxon p={c['p_value']:.3g}"
                        )
                        verdict = c["verdict"]
                out.append([task, metric, mode.name, _fmt_metric(metric, s), versus, verdict])
    return out


def print_table(run: Run, summary: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"modes against the {run.reference} reference", show_lines=False)
    for column in ("task", "metric", "mode", "value (95% CI)", f"vs {run.reference}"):
        table.add_column(column, overflow="fold")
    for row in rows(run, summary):
        table.add_row(*row[:5])
    console.print(table)
    for row in rows(run, summary):
        if row[5]:
            console.print(f"[bold]{row[2]}[/bold] {row[0]} {row[1]}: {row[5]}")
    for mode in run.modes:
        if mode.fidelity:
            f = mode.fidelity
            console.print(
                f"fidelity {mode.name} vs {run.reference}: KL {f['kl_mean']:.3e} nats/token, "
                f"top-1 agreement {100 * f['top1_agreement']:.2f}% over {f['position_count']} positions"
            )
    for warning in run.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}")


def markdown(run: Run, summary: dict) -> str:
    lines = [
        "# quamba-eval report",
        "",
        f"Reference mode: `{run.reference}`. Limit: {run.limit or 'none (full task)'}.",
        "",
        "| task | metric | mode | value (95% CI) | vs reference | verdict |",
        "|---|---|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows(run, summary)]
    lines += ["", "## Fidelity (next-token distributions against the reference)", ""]
    lines += ["| mode | KL mean (nats) | top-1 agreement | perplexity | reference perplexity |"]
    lines += ["|---|---|---|---|---|"]
    for mode in run.modes:
        f = mode.fidelity
        if f:
            lines.append(
                f"| {mode.name} | {f['kl_mean']:.3e} | {100 * f['top1_agreement']:.2f}% | "
                f"{f['perplexity']:.3f} | {f['ref_perplexity']:.3f} |"
            )
    lines += ["", "## Time", ""]
    lines += [f"- {m.name}: {m.seconds:.1f} s" for m in run.modes]
    if run.warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in run.warnings]
    lines += ["", "## Modes", ""]
    for mode in run.modes:
        lines += [
            f"### {mode.name}",
            "",
            "```json",
            json.dumps(mode.description, indent=2),
            "```",
            "",
        ]
    lines += [
        "## Provenance",
        "",
        "```json",
        json.dumps(run.provenance, indent=2, default=str),
        "```",
    ]
    return "\n".join(lines) + "\n"

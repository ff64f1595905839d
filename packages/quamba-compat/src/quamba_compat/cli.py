"""Command line: ``quamba-compat convert SRC DST`` and ``quamba-compat inspect SRC``."""

from __future__ import annotations

import argparse
import logging
import sys

from quamba_compat.convert import convert
from quamba_compat.legacy import LegacyCheckpointError, load_legacy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="quamba-compat", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="convert a legacy Quamba1 W8A8 checkpoint")
    conv.add_argument("source", help="legacy checkpoint directory or hub id")
    conv.add_argument("destination", help="output directory (config.json + model.safetensors)")
    insp = sub.add_parser("inspect", help="load a legacy checkpoint and list the rules applied")
    insp.add_argument("source")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        if args.command == "convert":
            out = convert(args.source, args.destination)
            print(f"wrote {out}")
        else:
            model = load_legacy(args.source)
            cfg = model.cfg
            print(
                f"Quamba1 W8A8: d_model={cfg.d_model} n_layer={cfg.n_layer} vocab={cfg.vocab_size} "
                f"embedding={cfg.embedding} lm_head={cfg.lm_head}"
            )
            for rule in model.provenance.get("legacy_rules", []):
                print(f"  rule: {rule}")
    except (LegacyCheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"quamba-compat: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Write a random-weight Mamba-1 checkpoint in a real layout (for tests and benchmarks).

    python tools/make_checkpoint.py --preset 130m --layout mamba_ssm --out /tmp/mamba-130m-random
    python tools/make_checkpoint.py --preset 130m --layout hf --n-layer 2 --dtype float16 --bin \
        --out /tmp/tiny

The weights are initialised like mamba_ssm (see `quamba_layers.model.MambaLM`) from `--seed`,
so the same arguments always write the same tensors.
"""

from __future__ import annotations

import argparse
import sys

import torch

from quamba_layers.config import PRESETS, MambaConfig
from quamba_layers.loading import LAYOUTS, save_model
from quamba_layers.model import MambaLM

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Write a random-weight Mamba-1 checkpoint in the mamba_ssm or hf layout."
    )
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS), help="model size")
    parser.add_argument("--layout", required=True, choices=LAYOUTS, help="checkpoint layout")
    parser.add_argument("--out", required=True, help="output directory (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="initialisation seed (default 0)")
    parser.add_argument(
        "--dtype", choices=sorted(_DTYPES), default="float32", help="weight dtype (default float32)"
    )
    parser.add_argument(
        "--n-layer", type=int, default=None, help="override the number of layers (small models)"
    )
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument(
        "--safetensors",
        dest="safetensors",
        action="store_true",
        default=True,
        help="write model.safetensors (default)",
    )
    weights.add_argument(
        "--bin", dest="safetensors", action="store_false", help="write pytorch_model.bin"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse `argv`, build the random model, save it; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    overrides = {}
    if args.n_layer is not None:
        if args.n_layer < 1:
            parser.error(f"--n-layer must be >= 1, got {args.n_layer}")
        overrides["n_layer"] = args.n_layer
    config = MambaConfig.from_preset(args.preset, **overrides)
    model = MambaLM(config, seed=args.seed, dtype=_DTYPES[args.dtype])
    directory = save_model(model, args.out, layout=args.layout, safetensors=args.safetensors)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"wrote {args.preset} (n_layer={config.n_layer}, {n_params / 1e6:.1f}M parameters, "
        f"{args.dtype}, seed {args.seed}) in the {args.layout} layout to {directory}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

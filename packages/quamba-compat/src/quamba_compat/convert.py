"""``quamba-compat convert SRC DST``: a legacy checkpoint -> our safetensors W8A8 format."""

from __future__ import annotations

import os
from pathlib import Path

from quamba_compat.legacy import CONFIG_FILE, WEIGHTS_FILE, load_legacy, resolve_legacy_dir
from quamba_layers.quant.checkpoint import save_quantized
from quamba_layers.quant.data import file_sha256
from quamba_layers.quant.provenance import package_versions


def convert(source: str | os.PathLike, destination: str | os.PathLike) -> Path:
    """Write ``source`` (legacy Quamba1 W8A8) as a quamba-w8a8 checkpoint naming its source."""
    destination = Path(destination)
    directory = resolve_legacy_dir(source)
    if destination.resolve() == directory.resolve():
        raise ValueError(
            "destination must differ from the source directory (nothing is overwritten)"
        )
    model = load_legacy(directory)
    model.provenance["converted_from"] = {
        "source": str(source),
        "weights_sha256": file_sha256(directory / WEIGHTS_FILE),
        "config_sha256": file_sha256(directory / CONFIG_FILE),
        "versions": package_versions(),
    }
    return save_quantized(model, destination)

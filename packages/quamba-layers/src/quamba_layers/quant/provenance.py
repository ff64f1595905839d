"""What produced a result: package versions, file hashes."""

from __future__ import annotations

import importlib.metadata
import platform

PACKAGES = (
    "quamba-layers",
    "quamba-kernels",
    "quamba-modes",
    "quamba-eval",
    "quamba-compat",
    "torch",
    "lm-eval",
)


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions

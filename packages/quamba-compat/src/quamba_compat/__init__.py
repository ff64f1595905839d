"""Load and convert legacy Quamba1 W8A8 checkpoints (upstream Quamba and the Quamba-SE fork)."""

from quamba_compat.convert import convert
from quamba_compat.legacy import (
    LegacyCheckpointError,
    LegacyLoadReport,
    load_legacy,
    load_state_dict_safely,
    read_legacy_config,
)

__version__ = "0.1.0"

__all__ = [
    "LegacyCheckpointError",
    "LegacyLoadReport",
    "__version__",
    "convert",
    "load_legacy",
    "load_state_dict_safely",
    "read_legacy_config",
]

"""Precision modes of the INT8 Mamba datapath as data: registry, resolution, legacy env vars, tables."""

from quamba_layers.datapath import Datapath, DatapathError, Rounding
from quamba_modes.legacy_env import LEGACY_VARIABLES, check_against_cli, legacy_mode_from_env
from quamba_modes.registry import (
    BUILTIN_MODE_NAMES,
    REGISTRY,
    REMOVED_MODES,
    Mode,
    ModeError,
    Relation,
    get_mode,
    mode_names,
    parse_modes,
    register_mode,
    unregister_mode,
)
from quamba_modes.resolve import (
    SSM_IMPL_OVERRIDES,
    STAGES,
    ResolvedMode,
    datapath_stages,
    resolve_mode,
)
from quamba_modes.table import modes_json, modes_table

__version__ = "0.1.0"

__all__ = [
    "BUILTIN_MODE_NAMES",
    "LEGACY_VARIABLES",
    "REGISTRY",
    "REMOVED_MODES",
    "SSM_IMPL_OVERRIDES",
    "STAGES",
    "Datapath",
    "DatapathError",
    "Mode",
    "ModeError",
    "Relation",
    "ResolvedMode",
    "Rounding",
    "__version__",
    "check_against_cli",
    "datapath_stages",
    "get_mode",
    "legacy_mode_from_env",
    "mode_names",
    "modes_json",
    "modes_table",
    "parse_modes",
    "register_mode",
    "resolve_mode",
    "unregister_mode",
]

"""Quantized Mamba-1 layers (W8A8, Quamba1), the FP Mamba-1 model, PTQ calibration, checkpoints.

Every quantized op is defined by a pure-PyTorch reference (``quamba_layers.reference_ops``); with
quamba-kernels on a CUDA device the same ops run as kernels (see ``quamba_layers.quant.backends``).
"""

from quamba_layers.config import PRESETS, MambaConfig
from quamba_layers.datapath import Datapath, DatapathError, Rounding
from quamba_layers.loading import load_config, load_model, save_model
from quamba_layers.model import LMOutput, MambaLM
from quamba_layers.quant import (
    QuantizedMambaLM,
    QuantRecipe,
    calibration_set,
    load_quantized,
    quantize,
    save_quantized,
    select_backend,
)
from quamba_layers.tokenizer import ByteTokenizer, load_tokenizer

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "ByteTokenizer",
    "Datapath",
    "DatapathError",
    "LMOutput",
    "MambaConfig",
    "MambaLM",
    "QuantRecipe",
    "QuantizedMambaLM",
    "Rounding",
    "__version__",
    "calibration_set",
    "load_config",
    "load_model",
    "load_quantized",
    "load_tokenizer",
    "quantize",
    "save_model",
    "save_quantized",
    "select_backend",
]

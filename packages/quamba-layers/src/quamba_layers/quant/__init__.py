"""Post-training W8A8 quantization (Quamba1): observers, calibration, quantized modules, I/O."""

from quamba_layers.quant.backends import Backend, kernels_status, reference_backend, select_backend
from quamba_layers.quant.checkpoint import is_quantized_checkpoint, load_quantized, save_quantized
from quamba_layers.quant.data import CalibrationSet, calibration_set, calibration_set_from_texts
from quamba_layers.quant.modules import QuantizedConfig, QuantizedMambaLM, W8A8Mixer
from quamba_layers.quant.observers import MinMaxObserver, PercentileObserver
from quamba_layers.quant.quantize import quantize
from quamba_layers.quant.recipe import RECIPES, QuantRecipe, get_recipe

__all__ = [
    "RECIPES",
    "Backend",
    "CalibrationSet",
    "MinMaxObserver",
    "PercentileObserver",
    "QuantRecipe",
    "QuantizedConfig",
    "QuantizedMambaLM",
    "W8A8Mixer",
    "calibration_set",
    "calibration_set_from_texts",
    "get_recipe",
    "is_quantized_checkpoint",
    "kernels_status",
    "load_quantized",
    "quantize",
    "reference_backend",
    "save_quantized",
    "select_backend",
]

"""The framework-neutral GPT-2 specification: SPEC.md in code.

ModelSpec (the config), the canonical parameter table, the shared input
checks, the tolerance policy and the float64 numpy reference (`reference`).
"""
from .checks import DTYPES, IGNORE_INDEX, canonical_dtype
from .config import OPTIONS, PRESETS, REAL_PRESETS, SPEC_VERSION, ModelSpec
from .errors import BackendError, InputError, SpecError, WeightsError
from .params import ParamInfo, param_shapes, param_table
from .train import TRAIN_PRESETS, TrainingDiverged, TrainSpec, lr_at

__all__ = [
    "ModelSpec", "PRESETS", "REAL_PRESETS", "OPTIONS", "SPEC_VERSION",
    "ParamInfo", "param_table", "param_shapes",
    "DTYPES", "IGNORE_INDEX", "canonical_dtype",
    "SpecError", "WeightsError", "InputError", "BackendError",
    "TrainSpec", "TRAIN_PRESETS", "lr_at", "TrainingDiverged",
]

"""S-CFG (Semantic-aware Classifier-Free Guidance, Shen et al., CVPR 2024): the host-agnostic core.

Pure torch + einops; nothing here imports a WebUI. Host adapters live in ``scfg_ext.hosts``.
"""

from .attention import head_mean_probs, power_weights, refine, refine_streamed
from .guidance import combine, correction, prescale_cond, rate_from_labels, rate_map
from .params import (
    FIELDS,
    ScfgParamError,
    ScfgParams,
    from_infotext,
    from_script_args,
    make_params,
    to_infotext,
)
from .segment import semantic_masks, smooth3x3, start_positions
from .step import CaptureError, Pair, StepCapture, StepResult

__version__ = "0.1.0"

__all__ = [
    "FIELDS", "CaptureError", "Pair", "ScfgParamError", "ScfgParams", "StepCapture", "StepResult",
    "combine", "correction", "from_infotext", "from_script_args", "head_mean_probs", "make_params",
    "power_weights", "prescale_cond", "rate_from_labels", "rate_map", "refine", "refine_streamed",
    "semantic_masks", "smooth3x3", "start_positions", "to_infotext",
]

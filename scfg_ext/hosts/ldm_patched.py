"""reForge and Forge Classic: Forge's adapter over ``ldm_patched`` (their ComfyUI-derived sampler).

Both keep Forge's UNet patcher and model-options lists, A1111's ``modules/`` and attention replace
patches keyed ``(block, id, index)`` / ``(block, id)`` with ``cond_or_uncond`` rows; so everything
of ``forge.py`` applies, and only the module paths differ (this file). reForge runs its
``sampler_pre_cfg_function`` list after the UNet in the newer ComfyUI form, so there the step
starts in the conditioning modifier. Importing this module points ``forge.BACKEND`` at
``ldm_patched``: it is imported only inside such a host (``hosts.detect_host``).
"""

from __future__ import annotations

from types import SimpleNamespace

from . import common, forge
from .forge import installed, on_cfg_denoiser, setup, teardown

__all__ = ["installed", "on_cfg_denoiser", "prompt_tokens", "setup", "teardown", "unsupported_reason"]


def _attention():
    from ldm_patched.ldm.modules import attention

    return attention.optimized_attention  # looked up per pass: the host picks it at start


def _cond_equal_size():
    from ldm_patched.modules.samplers import cond_equal_size

    return cond_equal_size


def _upcast() -> bool:
    try:
        from ldm_patched.modules.args_parser import args

        return not getattr(args, "disable_attention_upcast", False)
    except Exception:
        return True


def _unet_class():
    from ldm_patched.ldm.modules.diffusionmodules.openaimodel import UNetModel

    return UNetModel


def _to_x0(model):
    return model.model_sampling.calculate_denoised


def _pre_cfg_before_unet() -> bool:
    """Classic: the old form before the UNet. reForge (it has calc_cond_batch): fn(args) after it."""
    from ldm_patched.modules import samplers

    return not hasattr(samplers, "calc_cond_batch")


def unsupported_reason(p) -> str | None:
    return forge.unsupported_reason(p)


def prompt_tokens(p, text: str) -> list[str | None]:
    """Both keep A1111's text encoder wrappers (``cond_stage_model.tokenize_line``)."""
    return common.a1111_prompt_tokens(p.sd_model.cond_stage_model, text)


def configure() -> None:
    forge.BACKEND = SimpleNamespace(attention=_attention, cond_equal_size=_cond_equal_size, upcast=_upcast,
                                    unet_class=_unet_class, to_x0=_to_x0,
                                    pre_cfg_before_unet=_pre_cfg_before_unet(), name="ldm_patched")


try:
    configure()
except ImportError:  # outside such a host (unit tests configure it with their fakes)
    pass

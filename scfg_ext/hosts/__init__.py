"""Host adapters: one thin module per backend family, translating its hooks into ``scfg_ext`` core calls.

``a1111``        AUTOMATIC1111 (``sd_samplers_cfg_denoiser`` and its CFG callbacks).
``forge``        Forge 2 (``backend/``): Forge main, Forge Neo.
``ldm_patched``  reForge and Forge Classic: Forge's adapter over their ``ldm_patched`` sampler.

Each adapter module provides the same functions, which the script in ``scripts/`` calls:

``setup(p, params, report)``  from ``process_before_every_sampling``: install this sampling pass's
                              hooks or patches (idempotent; a previous install is removed first).
                              ``params`` are the pass's parameters (hires pass: ``for_hires()``).
``teardown()``                remove everything ``setup`` installed; safe to call at any time.
``installed()``               a list of strings naming the hooks installed right now.
``unsupported_reason(p)``     None, or why S-CFG cannot run on this model (SD3, Flux, edit models).
``prompt_tokens(p, text)``    the token strings of ``text`` as the model's tokenizer makes them, one
                              per context position (77 per chunk; None for START, END and padding),
                              for the preview legend.

What every adapter decides alike lives in ``common``. While recording previews, adapters call
``report.record(step, total, result, rows, scales)`` after each applied step, with
``rows[k] = (image index in the job, AND sub-prompt index)``.

Adapters import their WebUI lazily inside these functions, so that this package imports anywhere.
"""

from __future__ import annotations

import importlib
import importlib.util

HOSTS = ("a1111", "forge", "ldm_patched")


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def detect_host() -> str:
    """The backend family, by what the WebUI has (not by its name): Forge's ``backend/`` sampler,
    else an ``ldm_patched`` sampler with Forge's UNet patcher, else A1111's."""
    if not _has("modules_forge"):
        return "a1111"
    if _has("backend.sampling.sampling_function"):
        return "forge"
    if _has("ldm_patched.modules.samplers"):
        return "ldm_patched"
    return "a1111"


def host_name(host: str) -> str:
    """The WebUI and its version for the status route and the UI note, e.g. "Forge Neo"."""
    try:
        from modules_forge import forge_version

        version = str(forge_version.version)
    except Exception:
        version = ""
    if host == "a1111":
        try:
            from modules import launch_utils

            return f"AUTOMATIC1111 {launch_utils.git_tag()}".strip()
        except Exception:
            return "AUTOMATIC1111"
    if version in ("neo", "classic"):
        return f"Forge {version.capitalize()}"
    if host == "ldm_patched":
        return f"reForge {version}".strip()
    return f"Forge {version}".strip()


def adapter(host: str):
    """The adapter module of ``host``."""
    if host not in HOSTS:
        raise ValueError(f"unknown host {host!r}")
    return importlib.import_module(f"{__name__}.{host}")

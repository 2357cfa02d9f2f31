"""Host adapters: one thin module per WebUI, translating its hooks into ``scfg_ext`` core calls.

Each adapter module provides the same four functions, which the script in ``scripts/`` calls:

``setup(p, params, report)``  from ``process_before_every_sampling``: install this sampling pass's
                              hooks or patches (idempotent; a previous install is removed first).
                              ``params`` are the pass's parameters (hires pass: ``for_hires()``).
``teardown()``                remove everything ``setup`` installed; safe to call at any time.
``installed()``               a list of strings naming the hooks installed right now.
``unsupported_reason(p)``     None, or why S-CFG cannot run on this model (SD3, Flux, edit models).
``prompt_tokens(p, text)``    the token strings of ``text`` as the model's tokenizer makes them, one
                              per context position (77 per chunk; None for START, END and padding),
                              for the preview legend.

While recording previews, adapters call ``report.record(step, total, result, rows, scales)`` after
each applied step, with ``rows[k] = (image index in the job, AND sub-prompt index)``.

Adapters import their WebUI lazily inside these functions, so that this package imports anywhere.
"""

from __future__ import annotations

import importlib
import importlib.util


def detect_host() -> str:
    """"forge" for WebUI Forge with its backend/, else "a1111"."""
    try:
        forge = (importlib.util.find_spec("backend.sampling.sampling_function") is not None
                 and importlib.util.find_spec("modules_forge") is not None)
    except (ImportError, ValueError):
        forge = False
    return "forge" if forge else "a1111"


def adapter(host: str):
    """The adapter module of ``host``."""
    if host not in ("a1111", "forge"):
        raise ValueError(f"unknown host {host!r}")
    return importlib.import_module(f"{__name__}.{host}")

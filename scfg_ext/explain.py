"""The accordion's live picture: what the current settings do, in the terms of the WebUI's CFG.

The step window over the sampling steps, and the CFG scale a region can get: γ·r with the rate r
clamped to [min rate, min(max rate, max effective CFG / γ)] (eq. 13 with the authors' clamps;
``guidance.rate_from_labels``). Strength blends r towards 1 before the clamps, so it moves the
regions inside that range, not the range itself.
"""

from __future__ import annotations

import html

from .params import ScfgParams

INPUTS = ("strength", "min_rate", "max_rate", "max_scale", "start", "end")  # then cfg_scale, steps
CELL = 9


def cfg_range(cfg_scale: float, min_rate: float, max_rate: float, max_scale: float) -> tuple[float, float]:
    """The lowest and highest CFG scale any region gets at this CFG scale."""
    gamma = float(cfg_scale)
    high = min(max_rate * gamma, max_scale)
    return min(min_rate * gamma, high), high


def active_steps(steps: int, start: float, end: float) -> list[bool]:
    """Which sampling steps S-CFG acts on (the rule of ``ScfgParams.active_at``)."""
    window = ScfgParams(start=start, end=end)
    return [window.active_at(i, steps) for i in range(steps)]


def summary(strength, min_rate, max_rate, max_scale, start, end, cfg_scale=7.0, steps=20) -> str:
    """One line in words: which steps, and the CFG range the regions share."""
    steps = max(1, int(steps))
    active = sum(active_steps(steps, start, end))
    if float(cfg_scale) <= 1:
        return f"CFG {cfg_scale:g}: no guidance to share out, S-CFG leaves it as it is"
    if float(strength) == 0:
        return f"strength 0: plain CFG {cfg_scale:g} everywhere"
    low, high = cfg_range(cfg_scale, min_rate, max_rate, max_scale)
    capped = " (capped by max effective CFG)" if max_rate * float(cfg_scale) > max_scale else ""
    return (f"steps {active} of {steps}: regions get CFG {low:.1f} to {high:.1f} instead of "
            f"{float(cfg_scale):g}{capped}")


def picture(strength, min_rate, max_rate, max_scale, start, end, cfg_scale=7.0, steps=20) -> str:
    """HTML: a strip of the sampling steps (filled where S-CFG acts) and the summary line."""
    steps = max(1, int(steps))
    cells = active_steps(steps, start, end)
    width = min(CELL, 300 // steps) or 1
    rects = "".join(
        f'<rect x="{i * width}" y="0" width="{max(width - 1, 1)}" height="10" '
        f'class="{"scfg-on" if on else "scfg-off"}"/>' for i, on in enumerate(cells))
    text = html.escape(summary(strength, min_rate, max_rate, max_scale, start, end, cfg_scale, steps))
    return (f'<div class="scfg-picture"><svg width="{steps * width}" height="10" role="img" '
            f'aria-label="S-CFG step window">{rects}</svg><span>{text}</span></div>')

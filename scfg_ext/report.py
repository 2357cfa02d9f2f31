"""What S-CFG did in a run: applied steps, fallbacks and their reasons, rate statistics.

Hosts record into a ``RunReport``; the script exposes the last one through ``/scfg/v1/status`` and
the infotext. A failure inside S-CFG is logged once per run and reason, never raised.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from dataclasses import dataclass, field

import torch

from .preview import PreviewStep, steps_to_record

log = logging.getLogger("scfg")


@dataclass
class RunReport:
    host: str = ""
    applied: int = 0
    fallbacks: Counter = field(default_factory=Counter)
    rate_min: float | None = None
    rate_max: float | None = None
    _rate_sum: float = 0.0
    _rate_count: int = 0
    warned: set = field(default_factory=set)
    notes: list = field(default_factory=list)
    preview_steps: int = 0  # steps to record per sampling pass for previews; 0 records nothing
    phase: str = ""  # the sampling pass being recorded: "" or "hires"
    previews: dict = field(default_factory=dict)  # (image, sub-prompt) -> [PreviewStep]
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def step_applied(self, rate: torch.Tensor) -> None:
        lo, hi, mean = rate.min().item(), rate.max().item(), rate.float().mean().item()
        with self._lock:
            self.applied += 1
            self.rate_min = lo if self.rate_min is None else min(self.rate_min, lo)
            self.rate_max = hi if self.rate_max is None else max(self.rate_max, hi)
            self._rate_sum += mean
            self._rate_count += 1

    def record(self, step: int, total: int, result, rows: list[tuple[int, int]], scales: list[float]) -> None:
        """Keep the low-resolution maps of a few steps for previews (nothing when previews are off).

        step: 0-based sampling step; rows[k] = (image index, sub-prompt index) of the result's row k.
        """
        if not self.preview_steps or step not in steps_to_record(total, self.preview_steps):
            return
        for k, key in enumerate(rows):
            shot = PreviewStep(step + 1, total, result.labels[k].cpu(), result.foreground[k, 0].cpu(),
                               result.rate[k, 0].float().cpu(), float(scales[k]), self.phase)
            with self._lock:
                steps = self.previews.setdefault(key, [])
                # second-order samplers evaluate a step twice: keep the later one
                steps[:] = [s for s in steps if (s.phase, s.step) != (shot.phase, shot.step)] + [shot]

    def fallback(self, reason: str, warn: bool = False, exc: BaseException | None = None) -> None:
        """A step that used plain CFG. ``warn`` logs it, once per run and reason."""
        with self._lock:
            self.fallbacks[reason] += 1
            first = reason not in self.warned
            if warn and first:
                self.warned.add(reason)
        if warn and first:
            log.warning("S-CFG: %s; this step and others like it use plain CFG", reason, exc_info=exc)

    def note(self, text: str) -> None:
        """A run-level remark (e.g. 'S-CFG does not apply to SD3') for the infotext and status."""
        if text not in self.notes:
            self.notes.append(text)
            log.warning("S-CFG: %s", text)

    @property
    def rate_mean(self) -> float | None:
        return self._rate_sum / self._rate_count if self._rate_count else None

    def warning_text(self) -> str:
        """One line for the infotext, empty when nothing went wrong."""
        parts = list(self.notes) + [f"{reason} ({n} steps)" for reason, n in self.fallbacks.items()
                                    if reason in self.warned]
        return "; ".join(parts)

    def as_dict(self) -> dict:
        return {
            "host": self.host,
            "steps_applied": self.applied,
            "steps_fallback": dict(self.fallbacks),
            "rate": {"min": self.rate_min, "mean": self.rate_mean, "max": self.rate_max},
            "notes": list(self.notes),
        }

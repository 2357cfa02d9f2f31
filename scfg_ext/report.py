"""What S-CFG did in a run: applied steps, fallbacks and their reasons, rate statistics.

Hosts record into a ``RunReport``; the script exposes the last one through ``/scfg/v1/status`` and
the infotext. A failure inside S-CFG is logged once per run and reason, never raised.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import Counter
from dataclasses import dataclass, field

import torch

from .preview import PreviewStep, steps_to_record

log = logging.getLogger("scfg")
_RUNS = itertools.count(1)


@dataclass
class RunReport:
    host: str = ""
    enabled: bool = True  # False: a generation with S-CFG off (the status route shows the last one)
    seed: int | None = None  # the generation's first seed, to tell runs apart
    run: int = field(default_factory=lambda: next(_RUNS))  # grows with every report of the process
    applied: int = 0
    fallbacks: Counter = field(default_factory=Counter)
    _stats: object = None  # [min, max, sum of means] of the rate, on the device until read
    _rate_count: int = 0
    warned: set = field(default_factory=set)
    notes: list = field(default_factory=list)
    preview_steps: int = 0  # steps to record per sampling pass for previews; 0 records nothing
    raw_maps: bool = False  # record every step, and give the maps in as_dict (API: raw_maps)
    phase: str = ""  # the sampling pass being recorded: "" or "hires"
    previews: dict = field(default_factory=dict)  # (image, sub-prompt) -> [PreviewStep]
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def step_applied(self, rate: torch.Tensor) -> None:
        """Count a step; its rate statistics stay on the device (no sync) until they are read."""
        flat = rate.detach().float().flatten()
        stats = torch.stack([flat.min(), flat.max(), flat.mean()])
        with self._lock:
            self.applied += 1
            if self._stats is None:
                self._stats = stats
            else:
                self._stats = torch.stack([torch.minimum(self._stats[0], stats[0]),
                                           torch.maximum(self._stats[1], stats[1]),
                                           self._stats[2] + stats[2]])
            self._rate_count += 1

    def _read(self) -> list[float] | None:
        with self._lock:
            return None if self._stats is None else self._stats.tolist()

    @property
    def rate_min(self) -> float | None:
        stats = self._read()
        return None if stats is None else stats[0]

    @property
    def rate_max(self) -> float | None:
        stats = self._read()
        return None if stats is None else stats[1]

    def record(self, step: int, total: int, result, rows: list[tuple[int, int]], scales: list[float]) -> None:
        """Keep the low-resolution maps of a few steps for previews (nothing when previews are off).

        step: 0-based sampling step; rows[k] = (image index, sub-prompt index) of the result's row k.
        """
        wanted = self.raw_maps or (self.preview_steps and step in steps_to_record(total, self.preview_steps))
        if not wanted:
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
        stats = self._read()
        return None if stats is None else stats[2] / self._rate_count

    def warning_text(self) -> str:
        """One line for the infotext, empty when nothing went wrong."""
        parts = list(self.notes) + [f"{reason} ({n} steps)" for reason, n in self.fallbacks.items()
                                    if reason in self.warned]
        return "; ".join(parts)

    def as_dict(self) -> dict:
        stats = self._read()  # the one read of the device statistics
        lo, hi, total = stats if stats is not None else (None, None, None)
        return {
            "host": self.host,
            "enabled": self.enabled,
            "seed": self.seed,
            "run": self.run,
            "steps_applied": self.applied,
            "steps_fallback": dict(self.fallbacks),
            "rate": {"min": lo, "mean": None if total is None else total / self._rate_count, "max": hi},
            "notes": list(self.notes),
            **({"maps": self.maps_as_lists()} if self.raw_maps else {}),
        }

    def preview_shots(self, key: tuple[int, int]) -> list[PreviewStep]:
        """The recorded steps of (image, sub-prompt) that the previews show: with raw_maps every step
        is recorded, the previews still show their ``preview_steps``."""
        with self._lock:
            shots = list(self.previews.get(key, []))
        if not self.raw_maps:
            return shots
        return [s for s in shots if s.step - 1 in steps_to_record(s.total, self.preview_steps)]

    def maps_as_lists(self) -> list[dict]:
        """Every recorded step of every (image, sub-prompt), as JSON-ready lists: labels [h][w] (token
        position per pixel of the mask grid), foreground [h][w] (0/1), rate [H][W] (latent size)."""
        with self._lock:
            items = sorted(self.previews.items())
        return [{"image": image, "sub_prompt": sub, "phase": shot.phase, "step": shot.step,
                 "total": shot.total, "labels": shot.labels.tolist(), "foreground": shot.foreground.tolist(),
                 "rate": [[round(v, 4) for v in row] for row in shot.rate.tolist()]}
                for (image, sub), shots in items for shot in shots]

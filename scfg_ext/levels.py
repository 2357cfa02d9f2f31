"""Which UNet attention levels S-CFG reads (paper §4.1: the two smallest resolutions)."""

from __future__ import annotations

import math


def select_levels(present: set[int] | list[int], explicit: tuple[int, ...] | None = None,
                  sdxl: bool = False) -> tuple[int, ...]:
    """Downsample factors to capture, from the factors at which the UNet has attention.

    auto: the two largest factors (SD1.x/SD2.x: latent/4 and latent/8, the authors' 16x16 and 8x8
    at 512 px). SDXL has attention only at latent/2 and latent/4, so the literal rule would take all
    70 blocks at latent/2; auto takes latent/4 alone, the authors' relative resolution.
    explicit: those factors that exist (an empty result means S-CFG cannot run on this model).
    """
    present = sorted(set(present))
    if explicit is not None:
        return tuple(f for f in explicit if f in present)
    if sdxl:
        return tuple(present[-1:])
    return tuple(present[-2:])


def level_size(height: int, width: int, factor: int) -> tuple[int, int]:
    """Token grid of a level: stride-2 convs with padding 1 round up at every halving."""
    return math.ceil(height / factor), math.ceil(width / factor)


def mask_grid_for(height: int, width: int, factors: tuple[int, ...]) -> tuple[int, int]:
    """The mask grid: the finest selected level (the authors upsample 8x8 maps to 16x16)."""
    return level_size(height, width, min(factors))

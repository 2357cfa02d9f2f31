"""Which UNet attention levels S-CFG reads (paper §4.1), and the geometry of a level's token grid."""

from __future__ import annotations

import math

# The authors read 16x16 and 8x8 at 512 px on SD1.5: the levels at latent/4 and latent/8.
AUTHORS_FACTORS = (4, 8)


def select_levels(present: set[int] | list[int], explicit: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """Downsample factors to capture, from the factors at which the UNet has attention.

    auto: the authors' levels, latent/4 and latent/8, wherever the model has them: SD1.x/SD2.x
    {1, 2, 4, 8} -> (4, 8); SDXL base {2, 4} -> (4,) (the literal "two smallest" rule would take
    all 70 blocks at latent/2); SDXL refiner {2, 4, 8} -> (4, 8). A model with neither gets its two
    coarsest levels. The rule depends only on the levels that exist, so every host decides alike.
    explicit: those factors that exist (an empty result means S-CFG cannot run on this model).
    """
    present = sorted(set(present))
    if explicit is not None:
        return tuple(f for f in explicit if f in present)
    authors = tuple(f for f in AUTHORS_FACTORS if f in present)
    return authors or tuple(present[-2:])


def level_size(height: int, width: int, factor: int) -> tuple[int, int]:
    """Token grid of a level: stride-2 convs with padding 1 round up at every halving."""
    return math.ceil(height / factor), math.ceil(width / factor)


def mask_grid_for(height: int, width: int, factors: tuple[int, ...]) -> tuple[int, int]:
    """The mask grid: the finest selected level (the authors upsample 8x8 maps to 16x16)."""
    return level_size(height, width, min(factors))


def finest_grid(sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """The mask grid from the layers' own (h, w): the largest of them."""
    return max(sizes, key=lambda s: s[0] * s[1])


def level_of_tokens(height: int, width: int, n: int, max_factor: int = 64) -> tuple[int, int] | None:
    """The (h, w) of the level with n tokens for a latent of height×width, if any.

    The token count falls strictly with the factor, so at most one level matches.
    """
    factor = 1
    while factor <= max_factor:
        h, w = level_size(height, width, factor)
        if h * w == n:
            return h, w
        factor *= 2
    return None


def level_choices(present: set[int] | list[int]) -> list[str]:
    """The UI's choices for the attention levels of a model with attention at ``present`` factors:
    "auto", every single level, and every pair ("4,8"), as ``params.parse_levels`` reads them."""
    present = sorted(set(present))
    pairs = [f"{a},{b}" for i, a in enumerate(present) for b in present[i + 1:]]
    return ["auto", *map(str, present), *pairs]

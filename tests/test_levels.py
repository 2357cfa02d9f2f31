"""The level rule that every host shares: it depends only on the levels a UNet has."""

import pytest

from scfg_ext.levels import finest_grid, level_choices, level_size, mask_grid_for, select_levels
from scfg_ext.params import parse_levels


@pytest.mark.parametrize("present,auto", [
    ({1, 2, 4, 8}, (4, 8)),   # SD1.x / SD2.x: the authors' 16x16 and 8x8 at 512 px
    ({2, 4}, (4,)),           # SDXL base: latent/4 only, not all 70 blocks at latent/2
    ({2, 4, 8}, (4, 8)),      # SDXL refiner: attention in the middle block too
    ({1, 2}, (1, 2)),         # neither authors' level: the two coarsest
    ({8}, (8,)),
    (set(), ()),
])
def test_auto_levels(present, auto):
    assert select_levels(present) == auto
    assert select_levels(sorted(present, reverse=True)) == auto  # order of discovery is irrelevant


def test_explicit_levels_keep_those_that_exist():
    assert select_levels({1, 2, 4, 8}, (2, 16)) == (2,)
    assert select_levels({2, 4}, (8,)) == ()


def test_grids_round_up_like_strided_convs():
    assert level_size(125, 93, 4) == (32, 24)
    assert mask_grid_for(64, 96, (4, 8)) == (16, 24)
    assert finest_grid([(8, 12), (16, 24), (4, 6)]) == (16, 24)


@pytest.mark.parametrize("present", [{1, 2, 4, 8}, {2, 4}, {2, 4, 8}, {8}])
def test_level_choices_are_the_models_levels_and_all_parse(present):
    choices = level_choices(present)
    assert choices[0] == "auto" and len(choices) == len(set(choices))
    chosen = [parse_levels(c) for c in choices[1:]]
    assert {f for c in chosen for f in c} == set(present)  # every level offered, none it lacks
    assert all(select_levels(present, c) == c for c in chosen)


def test_level_choices_of_sdxl_base():
    assert level_choices({4, 2}) == ["auto", "2", "4", "2,4"]

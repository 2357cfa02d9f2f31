"""The accordion's live picture says what the settings do, in the WebUI's CFG terms."""

import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from scfg_ext.explain import active_steps, cfg_range, picture, summary
from scfg_ext.guidance import rate_from_labels


@given(cfg=st.floats(1.1, 30), min_rate=st.floats(0, 2), max_rate=st.floats(2, 10),
       max_scale=st.floats(1, 100), strength=st.floats(0.1, 3))
def test_the_range_is_what_the_guidance_can_give(cfg, min_rate, max_rate, max_scale, strength):
    """Every γ·r the rate map can hold lies in the range the picture prints; the top is reached."""
    low, high = cfg_range(cfg, min_rate, max_rate, max_scale)
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    cond[..., :4, :] = uncond[..., :4, :] + 1e-3 * (cond - uncond)[..., :4, :]  # tiny η: rate → max
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    labels[..., 4:, :] = 1
    rate = rate_from_labels(labels, torch.ones(1, 1, 8, 8), cond, uncond, cfg, 2, min_rate, max_rate,
                            max_scale, strength=strength, smooth=False)
    effective = cfg * rate
    assert float(effective.min()) >= low * (1 - 1e-5) - 1e-6
    assert float(effective.max()) <= high * (1 + 1e-5) + 1e-6
    assert float(effective.max()) == pytest.approx(high, rel=1e-5)  # the near-zero-η region


def test_the_window_follows_start_and_end():
    assert active_steps(5, 0.0, 1.0) == [True] * 5
    assert active_steps(5, 0.5, 1.0) == [False, False, True, True, True]
    assert active_steps(5, 0.0, 0.25) == [True, True, False, False, False]


def test_summary_in_words():
    assert summary(1, 0.8, 3, 15, 0, 1, 7, 20) == \
        "steps 20 of 20: regions get CFG 5.6 to 15.0 instead of 7 (capped by max effective CFG)"
    assert summary(1, 0.8, 2, 15, 0, 0.5, 5, 10).startswith("steps 5 of 10: regions get CFG 4.0 to 10.0")
    assert "plain CFG" in summary(0, 0.8, 3, 15, 0, 1, 7, 20)
    assert "no guidance" in summary(1, 0.8, 3, 15, 0, 1, 1, 20)


@pytest.mark.parametrize("steps", [1, 20, 150])
def test_picture_has_a_cell_per_step(steps):
    html = picture(1, 0.8, 3, 15, 0.2, 0.8, 7, steps)
    assert len(re.findall("<rect ", html)) == steps
    assert html.count("scfg-on") == sum(active_steps(steps, 0.2, 0.8))

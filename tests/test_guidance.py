import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from scfg_ext import combine, correction, prescale_cond, rate_map, semantic_masks
from scfg_ext.guidance import guidance_norm

from .synthetic import cross_attention, region_labels


def predictions(b=2, c=4, h=16, w=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, h, w, generator=g), torch.randn(b, c, h, w, generator=g)


def quadrant_masks(b=2, h=4, w=4, L=6, tokens=(1, 2, 3, 0)):
    labels = region_labels(h, w)
    masks = torch.zeros(b, L, h, w)
    for r, t in enumerate(tokens):
        masks[:, t] = (labels == r).float()
    return masks


def random_masks(b, h, w, L, seed):
    g = torch.Generator().manual_seed(seed)
    maps = [torch.softmax(torch.randn(b, h * w, L, generator=g) * 3, -1)]
    return semantic_masks(maps, maps, [(h, w)])


def test_rate_one_is_plain_cfg_bit_for_bit():
    """Property 1, in fp32 and fp16."""
    for dtype in (torch.float32, torch.float16):
        c, u = (x.to(dtype) for x in predictions())
        plain = (u.float() + 7.5 * (c.float() - u.float())).to(dtype)
        assert torch.equal(combine(c, u, 7.5, torch.ones(2, 1, 16, 16)), plain)
        masks, fg = quadrant_masks(), torch.ones(2, 1, 4, 4)
        rate = rate_map(masks, fg, c, u, 7.5, min_rate=1.0, max_rate=1.0)
        assert torch.equal(rate, torch.ones_like(rate))
        assert torch.equal(combine(c, u, 7.5, rate), plain)
        assert torch.equal(prescale_cond(c, u, rate), c)


def test_eq13_hand_computed():
    """Two halves with η = 1 (left, foreground) and η = 2 (right): rates mean_fg/mean_region."""
    labels = region_labels(4, 4, "halves")
    masks = torch.stack([(labels == 0), (labels == 1)]).float()[None]
    fg = (labels == 0).float()[None, None]
    u = torch.zeros(1, 4, 4, 4)
    c = torch.zeros(1, 4, 4, 4)
    c[0, 0] = torch.where(labels == 0, 1.0, 2.0)
    rate = rate_map(masks, fg, c, u, 1.0, min_rate=0.0, max_rate=10.0, smooth=False)
    expected = torch.where(labels == 0, 1.0, 0.5)
    torch.testing.assert_close(rate[0, 0], expected)
    # eq. 13 literally: γ_i = γ·|m_b⊙η|/|m_i⊙η|·|m_i|/|m_b|
    eta = guidance_norm(c, u).view(4, 4)
    for i in (0, 1):
        m = masks[0, i]
        gamma_i = (fg[0, 0] * eta).sum() / (m * eta).sum() * m.sum() / fg[0, 0].sum()
        assert torch.allclose(rate[0, 0][m.bool()], gamma_i)


@given(image=st.integers(0, 1), factor=st.floats(0.01, 100.0), seed=st.integers(0, 999))
def test_scaling_c_minus_u_leaves_rates_unchanged(image, factor, seed):
    """Property 2: an ε/x0/v conversion scales c − u per image; the rates must not move."""
    c, u = predictions(seed=seed)
    masks, fg = random_masks(2, 4, 4, 6, seed)
    before = rate_map(masks, fg, c, u, 7.0)
    c2 = c.clone()
    c2[image] = u[image] + factor * (c[image] - u[image])
    after = rate_map(masks, fg, c2, u, 7.0)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


@given(lo=st.floats(0.0, 2.0), span=st.floats(0.0, 3.0), cap=st.floats(1.0, 40.0),
       gamma=st.floats(0.5, 30.0), strength=st.floats(0.0, 3.0), seed=st.integers(0, 999))
def test_rates_stay_inside_the_clamps_after_smoothing(lo, span, cap, gamma, strength, seed):
    """Property 5: min_rate ≤ r ≤ min(max_rate, cap/γ) (the cap wins when it is below min_rate)."""
    hi = lo + span
    c, u = predictions(seed=seed)
    masks, fg = random_masks(2, 4, 4, 6, seed)
    rate = rate_map(masks, fg, c, u, gamma, lo, hi, cap, strength=strength)
    upper = min(hi, cap / gamma)
    fp32 = 1e-6  # the bounds themselves are rounded to fp32
    assert rate.max().item() <= upper + fp32 * upper
    assert rate.min().item() >= min(lo, upper) - fp32 * max(lo, 1e-30)


@given(seed=st.integers(0, 999))
def test_batch_permutation_permutes_outputs(seed):
    """Property 6: no leakage between the images of a batch."""
    c, u = predictions(b=3, seed=seed)
    masks, fg = random_masks(3, 4, 4, 6, seed)
    gamma = torch.tensor([5.0, 7.0, 9.0])
    rate = rate_map(masks, fg, c, u, gamma)
    perm = torch.tensor([2, 0, 1])
    permuted = rate_map(masks[perm], fg[perm], c[perm], u[perm], gamma[perm])
    assert torch.equal(permuted, rate[perm])


def test_empty_foreground_gives_min_rate_everywhere():
    c, u = predictions()
    rate = rate_map(quadrant_masks(), torch.zeros(2, 1, 4, 4), c, u, 7.5)
    torch.testing.assert_close(rate, torch.full_like(rate, 0.8))


def test_strength_zero_is_plain_cfg():
    c, u = predictions()
    rate = rate_map(quadrant_masks(), torch.ones(2, 1, 4, 4), c, u, 7.5, strength=0.0)
    assert torch.equal(rate, torch.ones_like(rate))


def test_cap_uses_each_images_scale():
    c, u = predictions()
    c = u + 10 * (c - u)
    rate = rate_map(quadrant_masks(), torch.ones(2, 1, 4, 4), c, u, torch.tensor([5.0, 10.0]),
                    min_rate=0.0, max_rate=3.0, max_scale=15.0)
    assert rate[0].max() <= 3.0 and rate[1].max() <= 1.5


def test_zero_guidance_region_stays_finite():
    c, u = predictions()
    c[:, :, :8] = u[:, :, :8]  # c == u in the top half: η = 0 there
    rate = rate_map(quadrant_masks(), torch.ones(2, 1, 4, 4), c, u, 7.5)
    assert torch.isfinite(rate).all()


def test_correction_turns_plain_cfg_into_eq12():
    c, u = predictions()
    rate = 0.5 + torch.rand(2, 1, 16, 16)
    plain = u + 6.0 * (c - u)
    torch.testing.assert_close(plain + correction(c, u, 6.0, rate), combine(c, u, 6.0, rate))
    # and a linear combiner fed the pre-scaled cond gives eq. 12 as well
    torch.testing.assert_close(u + 6.0 * (prescale_cond(c, u, rate) - u), combine(c, u, 6.0, rate))


def test_masks_at_low_resolution_are_upsampled_nearest_to_the_latent():
    labels = region_labels(8, 8, "halves")
    cond = cross_attention(labels, [1, 2], 4)
    masks, fg = semantic_masks([cond], None, [(8, 8)], "paper", region="mean")
    c, u = predictions(b=1, h=32, w=32)
    rate = rate_map(masks, fg, c, u, 7.0, min_rate=0, max_rate=10, smooth=False)
    left, right = rate[0, 0, :, :16], rate[0, 0, :, 16:]
    assert left.unique().numel() == 1 and right.unique().numel() == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_come_back_in_their_dtype(dtype):
    c, u = (x.to(dtype) for x in predictions())
    rate = rate_map(quadrant_masks(), torch.ones(2, 1, 4, 4), c, u, 7.5)
    assert rate.dtype == dtype
    ref = rate_map(quadrant_masks(), torch.ones(2, 1, 4, 4), c.float(), u.float(), 7.5)
    torch.testing.assert_close(rate.float(), ref, atol=2e-2, rtol=2e-2)
    assert combine(c, u, 7.5, rate).dtype == dtype

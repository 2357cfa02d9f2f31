import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from scfg_ext import refine, semantic_masks, smooth3x3, start_positions
from scfg_ext.segment import FusedMaps, official_kernel_1d, token_labels

from .synthetic import block_self_attention, cross_attention, region_labels

PRESETS = ["official", "paper"]


def random_maps(b, sizes, L, seed=0, sharp=3.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.softmax(torch.randn(b, h * w, L, generator=g) * sharp, -1) for h, w in sizes]


def test_official_kernel_weights():
    torch.testing.assert_close(official_kernel_1d(), torch.tensor([0.2119, 0.5761, 0.2119]), atol=1e-4,
                               rtol=0)


def test_smoothing_is_the_separable_kernel_with_reflect_padding():
    x = torch.randn(2, 3, 5, 7)
    g = official_kernel_1d()
    k2 = (g[:, None] * g[None, :]).view(1, 1, 3, 3)
    ref = F.conv2d(F.pad(x.view(6, 1, 5, 7), (1, 1, 1, 1), mode="reflect"), k2).view(2, 3, 5, 7)
    torch.testing.assert_close(smooth3x3(x), ref)
    torch.testing.assert_close(smooth3x3(torch.ones(1, 1, 4, 4)), torch.ones(1, 1, 4, 4))
    assert smooth3x3(torch.ones(1, 1, 1, 3)).shape == (1, 1, 1, 3)  # 1-pixel axis: replicate


@given(b=st.integers(1, 3), h=st.integers(2, 9), w=st.integers(2, 9), L=st.integers(3, 20),
       preset=st.sampled_from(PRESETS), seed=st.integers(0, 999), data=st.data())
def test_masks_partition_pixels(b, h, w, L, preset, seed, data):
    """Property 3: the one-hot masks sum to exactly 1 at every pixel, also where tokens tie, and an
    exact tie at the argmax goes to the first tied position (as documented in segment.py).

    Inputs with ties: a duplicated token column, and uniform maps (every position tied). ATen's
    kernels may round identical channels differently (vector lanes vs tail), so a tie in the
    inputs need not survive as a bitwise tie to the argmax: whoever of the tied pair wins, the
    two together win what the first wins alone, and never two regions at one pixel (the
    authors' ``== max`` would put a tied pixel in both). The first-position rule itself is
    checked at the argmax, on fused maps with bitwise ties.
    """
    sizes = [(h, w), ((h + 1) // 2, (w + 1) // 2)]
    first = data.draw(st.integers(0, L - 2), label="first")
    copy = data.draw(st.integers(first + 1, L - 1), label="copy")
    cond, uncond = random_maps(b, sizes, L, seed), random_maps(b, sizes, L, seed + 1)
    for m in cond:
        m[..., copy] = m[..., first]
    uniform = [torch.full_like(m, 1.0 / L) for m in cond]
    for maps in (cond, uniform):
        masks, fg = semantic_masks(maps, uncond, sizes, preset)
        assert masks.shape == (b, L, h, w) and fg.shape == (b, 1, h, w)
        assert set(masks.unique().tolist()) <= {0.0, 1.0} and set(fg.unique().tolist()) <= {0.0, 1.0}
        assert torch.equal(masks.sum(1), torch.ones(b, h, w))  # a partition, ties included
    masks, _ = semantic_masks(cond, uncond, sizes, preset)
    alone = [m.clone() for m in cond]
    for m in alone:
        m[..., copy] = 0.0
    masks_alone, _ = semantic_masks(alone, uncond, sizes, preset)
    assert torch.equal(masks[:, first] + masks[:, copy], masks_alone[:, first])
    # the documented rule where the fused maps tie bitwise: first position wins
    tokens = torch.rand(b, L, h, w, generator=torch.Generator().manual_seed(seed))
    tokens[:, copy] = tokens[:, first]
    tokens[..., 0, 0] = 0.5  # one pixel where every position ties
    fused = FusedMaps(tokens, None, torch.zeros(b, dtype=torch.bool), torch.zeros(b, L, dtype=torch.bool))
    labels = token_labels(fused, "official")
    assert not (labels == copy).any() and (labels[..., 0, 0] == 0).all()
    assert torch.equal(labels, tokens.argmax(1))


def test_ties_go_to_the_first_position():
    maps = [torch.full((1, 4, 3), 1 / 3)]
    masks, _ = semantic_masks(maps, None, [(2, 2)], "paper")
    assert torch.equal(masks[0, 0], torch.ones(2, 2))


@given(token=st.integers(0, 9), factor=st.floats(0.01, 100.0), preset=st.sampled_from(PRESETS),
       seed=st.integers(0, 999))
def test_token_scale_invariance(token, factor, preset, seed):
    """Property 4: a token column times a positive constant leaves the token masks unchanged."""
    sizes = [(6, 6), (3, 3)]
    maps = random_maps(2, sizes, 10, seed)
    scaled = [m.clone() for m in maps]
    for m in scaled:
        m[..., token] *= factor
    before, _ = semantic_masks(maps, None, sizes, preset)
    after, _ = semantic_masks(scaled, None, sizes, preset)
    # Exact near-ties can flip in float; demand agreement on all but a vanishing share of pixels.
    assert (before != after).any(1).float().mean() <= 0.02


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("layout,tokens", [("quadrants", [1, 2, 3, 5]), ("halves", [4, 2])])
def test_synthetic_regions_come_back_exactly(preset, layout, tokens):
    """Property 7: token i attending only to region A_i gives back A_i, after refinement too."""
    labels = region_labels(8, 8, layout)
    cross = cross_attention(labels, tokens, L=7)
    refined = refine(block_self_attention(labels), cross, mode="official")
    small = F.interpolate(labels[None, None].float(), size=(4, 4), mode="nearest")[0, 0].long()
    refined_small = refine(block_self_attention(small), cross_attention(small, tokens, 7), mode="official")
    masks, _ = semantic_masks([refined, refined_small], None, [(8, 8), (4, 4)], preset)
    for r, t in enumerate(tokens):
        assert torch.equal(masks[0, t].bool(), labels == r)


@pytest.mark.parametrize("preset", PRESETS)
def test_foreground_is_where_start_loses_in_the_uncond_rows(preset):
    labels = region_labels(8, 8, "halves")  # left half: background (START), right: object
    cond = cross_attention(labels, [0, 3], L=6)
    uncond = cross_attention(labels, [0, 4], L=6)  # START wins the left half
    _, fg = semantic_masks([cond], [uncond], [(8, 8)], preset)
    assert torch.equal(fg[0, 0].bool(), labels == 1)
    _, whole = semantic_masks([cond], [uncond], [(8, 8)], preset, region="mean")
    assert torch.equal(whole, torch.ones_like(whole))


@pytest.mark.parametrize("preset", PRESETS)
def test_every_start_of_a_long_context_counts(preset):
    """Two 77-token chunks: the attention sink splits over START positions 0 and 77."""
    labels = region_labels(8, 8, "halves")
    L = 154
    assert start_positions(L) == [0, 77]
    uncond = torch.zeros(64, L)
    left, right = labels.flatten() == 0, labels.flatten() == 1
    uncond[:, 0] = 0.3                   # the first START alone is flat: it cannot tell the regions
    uncond[left, 77], uncond[left, 5] = 0.6, 0.1     # background: the second START
    uncond[right, 77], uncond[right, 5] = 0.0, 0.7   # object: one word
    uncond = uncond[None]
    cond = cross_attention(labels, [0, 3], L=L)
    _, fg = semantic_masks([cond], [uncond], [(8, 8)], preset)
    assert torch.equal(fg[0, 0].bool(), labels == 1)
    _, fg_first_only = semantic_masks([cond], [uncond], [(8, 8)], preset, uncond_starts=[0])
    assert not torch.equal(fg_first_only[0, 0].bool(), labels == 1)


@pytest.mark.parametrize("preset", PRESETS)
def test_uniform_uncond_takes_the_foreground_from_the_cond_rows(preset):
    """SDXL's empty negative prompt: an all-zero context gives uniform uncond attention."""
    labels = region_labels(8, 8, "halves")
    cond = cross_attention(labels, [0, 3], L=77)
    uniform = torch.full((1, 64, 77), 1 / 77)
    _, fg = semantic_masks([cond, cond], [uniform, uniform], [(8, 8), (8, 8)], preset)
    assert torch.equal(fg[0, 0].bool(), labels == 1)


@pytest.mark.parametrize("preset", PRESETS)
def test_non_square_layers_and_per_image_masks(preset):
    a, b = region_labels(12, 8, "halves"), region_labels(12, 8, "quadrants")
    cond = torch.cat([cross_attention(a, [1, 2], 6), cross_attention(b, [1, 2, 3, 4], 6)])
    small = [F.interpolate(x[None, None].float(), size=(6, 4), mode="nearest")[0, 0].long() for x in (a, b)]
    cond_small = torch.cat([cross_attention(small[0], [1, 2], 6), cross_attention(small[1], [1, 2, 3, 4], 6)])
    masks, _ = semantic_masks([cond, cond_small], None, [(12, 8), (6, 4)], preset)
    assert masks.shape == (2, 6, 12, 8)
    assert torch.equal(masks[0, 2].bool(), a == 1)
    assert torch.equal(masks[1, 4].bool(), b == 3)


def test_official_preset_hand_computed():
    """One 2x2 layer, three tokens: smoothing, per-token normalisation, argmax by hand."""
    maps = torch.tensor([[[0.6, 0.3, 0.1], [0.6, 0.1, 0.3], [0.5, 0.4, 0.1], [0.5, 0.1, 0.4]]])
    # reflect padding on 2 pixels: each output is 0.5761·own + 0.2119·2·other along each axis
    # (a=0.5761, b=0.4238), so token t smoothed at (i, j) = Σ weights; normalise by the mean.
    a, b = 0.5761, 1 - 0.5761
    grid = maps[0].T.reshape(3, 2, 2)
    smooth = torch.stack([a * a * g + a * b * g.flip(0) + b * a * g.flip(1) + b * b * g.flip(0).flip(1)
                          for g in grid])
    norm = smooth / smooth.mean((1, 2), keepdim=True)
    expected = norm.argmax(0)
    masks, fg = semantic_masks([maps], [maps], [(2, 2)], "official")
    assert torch.equal(masks[0].argmax(0), expected)
    start = smooth[0] / smooth[0].mean()
    rest = (smooth[1] + smooth[2]) / (smooth[1] + smooth[2]).mean()
    assert torch.equal(fg[0, 0].bool(), ~(start >= rest))


def test_paper_preset_hand_computed():
    """Eq. 9 on a 1x3 layer: token 2 is weak everywhere but strongest relative to its own sum."""
    maps = torch.tensor([[[0.7, 0.2, 0.1], [0.5, 0.45, 0.05], [0.6, 0.1, 0.3]]])
    masks, fg = semantic_masks([maps], [maps], [(1, 3)], "paper")
    # column sums: 1.8, 0.75, 0.45 -> normalised rows [.389 .267 .222] [.278 .6 .111] [.333 .133 .667]
    assert masks[0].argmax(0).tolist() == [[0, 1, 2]]
    assert fg[0, 0].tolist() == [[0.0, 1.0, 1.0]]


def test_dtype_and_device_of_results():
    """Results in the maps' dtype and on their device; ``meta`` is a device other than the CPU
    that every machine has, so a tensor made on the default device would show (or fail to mix)."""
    maps = [m.half() for m in random_maps(1, [(4, 4)], 5)]
    masks, fg = semantic_masks(maps, maps, [(4, 4)])
    assert masks.dtype == fg.dtype == torch.float16
    meta = [m.to("meta") for m in maps]
    masks, fg = semantic_masks(meta, meta, [(4, 4)])
    assert masks.device.type == fg.device.type == "meta"
    assert masks.dtype == fg.dtype == torch.float16 and masks.shape == (1, 5, 4, 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to check results stay on it")
def test_results_stay_on_cuda():
    maps = [m.half().cuda() for m in random_maps(1, [(4, 4)], 5)]
    masks, fg = semantic_masks(maps, maps, [(4, 4)])
    assert masks.device == fg.device == maps[0].device and masks.dtype == fg.dtype == torch.float16

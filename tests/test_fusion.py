"""The per-step layer fusion equals the authors' per-layer order of operations (float tolerance).

Reference: every layer upsampled to the mask grid, smoothed, each token divided by its grid mean
(official), then the layers averaged; [START, rest] from the smoothed maps, each normalised.
"""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from scfg_ext.segment import (
    EPS,
    Geometry,
    LayerFusion,
    as_start_mask,
    smooth3x3,
    spatial_normalise,
    start_vs_rest,
    to_grid,
)


def reference(layers, preset, grid, starts):
    tokens, rests = [], []
    mask = as_start_mask(starts, layers[0][0].shape[0], layers[0][0].shape[-1])
    for maps, size in layers:
        x = to_grid(maps.float(), size, grid)
        if preset == "official":
            x = smooth3x3(x)
            rests.append(spatial_normalise(start_vs_rest(x, mask)))
            x = spatial_normalise(x)
        tokens.append(x)
    rest = torch.stack(rests).mean(0) if rests else None
    return torch.stack(tokens).mean(0), rest


@settings(max_examples=25, deadline=None)
@given(preset=st.sampled_from(["official", "paper"]), rows=st.integers(1, 3),
       grid=st.sampled_from([(8, 8), (8, 12), (5, 7), (16, 16)]), extra=st.integers(0, 3),
       seed=st.integers(0, 2**16), long=st.booleans())
def test_fusion_equals_the_per_layer_reference(preset, rows, grid, extra, seed, long):
    g = torch.Generator().manual_seed(seed)
    length = 154 if long else 77
    coarse = (-(-grid[0] // 2), -(-grid[1] // 2))
    sizes = [grid, coarse, *[grid, coarse][:extra]]
    layers = [(torch.softmax(torch.randn(rows, s[0] * s[1], length, generator=g) * 3, -1), s) for s in sizes]
    starts = [[0, 77] if long and r % 2 == 0 else [0] for r in range(rows)]
    fusion = LayerFusion(preset, grid, starts, Geometry())
    for maps, size in layers:
        fusion.add(maps, size)
    fused = fusion.result()
    tokens, rest = reference(layers, preset, grid, starts)
    torch.testing.assert_close(fused.tokens, tokens, rtol=1e-4, atol=1e-6)
    if preset == "official":
        torch.testing.assert_close(fused.start_rest, rest, rtol=1e-4, atol=1e-6)
    assert not fused.uniform.any()


def test_mean_weights_give_the_grid_mean_of_the_smoothed_upsampled_map():
    g = torch.Generator().manual_seed(1)
    maps = torch.rand(2, 4 * 6, 3, generator=g)
    weights = Geometry().mean_weights((4, 6), (8, 12), True, "cpu")
    expected = smooth3x3(to_grid(maps, (4, 6), (8, 12))).mean((-2, -1))
    torch.testing.assert_close(torch.matmul(weights[0, 0], maps), expected, rtol=1e-5, atol=1e-7)
    assert abs(float(weights.sum()) - 1) < 1e-5  # a mean: constant maps stay constant


def test_uniform_context_is_detected_once_per_step():
    fusion = LayerFusion("official", (4, 4), [0])
    for size in ((4, 4), (2, 2)):
        fusion.add(torch.full((1, size[0] * size[1], 77), 1 / 77), size)
    assert fusion.result().uniform.all()
    assert EPS > 0

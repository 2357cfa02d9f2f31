import contextlib

import pytest
import torch

from scfg_ext import CaptureError, Pair, StepCapture, make_params, rate_map, refine_streamed, semantic_masks
from scfg_ext.attention import head_mean_probs

from .synthetic import fused_path, region_labels

HEADS, D = 2, 8
LAYERS = [("in7", (8, 8)), ("mid", (4, 4))]


def qk_for(labels, tokens, L, strength=6.0, seed=0):
    """Self q/k that attend within regions, and cross q/k where region r attends to tokens[r]."""
    g = torch.Generator().manual_seed(seed)
    n = labels.numel()
    basis = torch.zeros(n, HEADS * D)
    basis[torch.arange(n), labels.flatten()] = strength
    q_self = basis + 0.1 * torch.randn(n, HEADS * D, generator=g)
    keys = 0.1 * torch.randn(L, HEADS * D, generator=g)
    for r, t in enumerate(tokens):
        keys[t, r] = strength
    return q_self, q_self.clone(), q_self.clone(), keys


def layer_inputs(rows_layouts, L):
    """Per layer: stacked (q_self, k_self, q_cross, k_cross) for rows with their own region layouts."""
    out = []
    for _, (h, w) in LAYERS:
        parts = [qk_for(region_labels(h, w, layout), tokens, L, seed=i)
                 for i, (layout, tokens) in enumerate(rows_layouts)]
        out.append(tuple(torch.stack([p[j] for p in parts]) for j in range(4)))
    return out


def capture_rows(capture, rows, inputs):
    for (name, size), (qs, ks, qc, kc) in zip(LAYERS, inputs, strict=True):
        capture.self_attention(name, rows, qs, ks, HEADS, None)
        capture.cross_attention(name, rows, qc, kc, HEADS, None, size)


def predictions(k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(k, 4, 16, 16, generator=g), torch.randn(k, 4, 16, 16, generator=g)


@pytest.mark.parametrize("preset", ["official", "paper"])
def test_capture_equals_the_core_pipeline(preset):
    params = make_params(enabled=True, preset=preset)
    cond_rows = [("quadrants", [1, 2, 3, 4]), ("halves", [5, 6])]
    uncond_rows = [("halves", [0, 7]), ("halves", [7, 0])]
    cond_in, uncond_in = layer_inputs(cond_rows, 77), layer_inputs(uncond_rows, 77)
    capture = StepCapture(params, grid=(8, 8), layers=2)
    capture_rows(capture, (0, 1), cond_in)
    capture_rows(capture, (2, 3), uncond_in)
    c, u = predictions(2)
    result = capture.result([Pair(0, 2, 7.0), Pair(1, 3, 7.0)], c, u)

    def refined(inputs):
        return [refine_streamed(qs, ks, head_mean_probs(qc, kc, HEADS), HEADS, None, 4, params.preset)
                for qs, ks, qc, kc in inputs]

    masks, fg = semantic_masks(refined(cond_in), refined(uncond_in), [s for _, s in LAYERS], preset)
    torch.testing.assert_close(result.rate, rate_map(masks, fg, c, u, 7.0))
    assert torch.equal(result.labels, masks.argmax(1)) and torch.equal(result.foreground, fg)
    # each image got its own regions
    assert torch.equal(result.labels[0] == 4, region_labels(8, 8) == 3)
    assert torch.equal(result.labels[1] == 6, region_labels(8, 8, "halves") == 1)


def test_rows_from_separate_calls_and_and_prompts():
    """Cond and uncond in separate UNet calls; two AND sub-prompts share one image's uncond row."""
    params = make_params(enabled=True)
    cond_in = layer_inputs([("quadrants", [1, 2, 3, 4]), ("halves", [5, 6])], 77)
    uncond_in = layer_inputs([("halves", [0, 7])], 77)
    split = StepCapture(params, (8, 8), 2)
    capture_rows(split, (0, 1), cond_in)
    capture_rows(split, (2,), uncond_in)
    c, u = predictions(2)
    pairs = [Pair(0, 2, 7.0), Pair(1, 2, 3.5)]
    result = split.result(pairs, c, u)
    assert result.rate.shape == (2, 1, 16, 16)
    # the same rows gathered from one joint call give the same result
    joint = StepCapture(params, (8, 8), 2)
    both = [tuple(torch.cat([a, b]) for a, b in zip(x, y, strict=True))
            for x, y in zip(cond_in, uncond_in, strict=True)]
    capture_rows(joint, (0, 1, 2), both)
    torch.testing.assert_close(joint.result(pairs, c, u).rate, result.rate)


def test_mismatches_raise_capture_errors():
    params = make_params(enabled=True)
    (qs, ks, qc, kc), _ = layer_inputs([("halves", [1, 2])], 77)
    capture = StepCapture(params, (8, 8), 2)
    with pytest.raises(CaptureError, match="without its self-attention"):
        capture.cross_attention("in7", (0,), qc, kc, HEADS, None, (8, 8))
    with pytest.raises(CaptureError, match="rows"):
        capture.self_attention("in7", (0, 1), qs, ks, HEADS, None)
    capture.self_attention("in7", (0,), qs, ks, HEADS, None)
    with pytest.raises(CaptureError, match="tokens 64 != 4x8"):
        capture.cross_attention("in7", (0,), qc, kc, HEADS, None, (4, 8))
    capture.self_attention("in7", (0,), qs, ks, HEADS, None)
    capture.cross_attention("in7", (0,), qc, kc, HEADS, None, (8, 8))
    c, u = predictions(1)
    with pytest.raises(CaptureError, match=r"rows \[0\] were not captured at every target layer"):
        capture.result([Pair(0, 1, 7.0)], c, u)


@pytest.mark.parametrize("stage", ["cross_attention", "result"])
def test_injected_faults_raise_where_named(stage):
    params = make_params(enabled=True, test_fault=stage)
    inputs = layer_inputs([("halves", [1, 2]), ("halves", [0, 3])], 77)
    capture = StepCapture(params, (8, 8), 2)
    with pytest.raises(RuntimeError, match=f"injected test fault in {stage}"):
        capture_rows(capture, (0, 1), inputs)
        capture.result([Pair(0, 1, 7.0)], *predictions(1))


def test_a_second_pass_over_the_blocks_replaces_the_first():
    """ControlNet reference-only: a nested pass over every block before the main pass."""
    params = make_params(enabled=True)
    reference = layer_inputs([("quadrants", [1, 2, 3, 4]), ("halves", [0, 7])], 77)
    main = layer_inputs([("halves", [5, 6]), ("halves", [0, 7])], 77)
    twice, once = StepCapture(params, (8, 8), 2), StepCapture(params, (8, 8), 2)
    capture_rows(twice, (0, 1), reference)
    capture_rows(twice, (0, 1), main)
    capture_rows(once, (0, 1), main)
    c, u = predictions(1)
    pairs = [Pair(0, 1, 7.0)]
    torch.testing.assert_close(twice.result(pairs, c, u).rate, once.result(pairs, c, u).rate)


@pytest.mark.parametrize("preset", ["official", "paper"])
def test_the_fused_path_gives_the_same_step(preset, monkeypatch):
    """The GPU's fused SDPA path (forced) equals the materialised one, and takes SDPA for every map:
    one call for C and one per power of S."""
    params = make_params(enabled=True, preset=preset, refine_power=3)
    rows_layouts = [("quadrants", [1, 2, 3, 4]), ("halves", [5, 6]), ("halves", [0, 7]), ("halves", [7, 0])]
    inputs = layer_inputs(rows_layouts, 80)
    c, u = predictions(2)
    results, calls = [], []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    for fused in (False, True):
        capture = StepCapture(params, grid=(8, 8), layers=2)
        with fused_path() if fused else contextlib.nullcontext():
            capture_rows(capture, (0, 1, 2, 3), inputs)
            results.append(capture.result([Pair(0, 2, 7.0), Pair(1, 3, 7.0)], c, u))
        assert len(calls) == (len(LAYERS) * (1 + (2 if preset == "official" else 3)) if fused else 0)
        calls.clear()
    materialised, fused = results
    torch.testing.assert_close(fused.rate, materialised.rate)
    assert torch.equal(fused.labels, materialised.labels)
    assert torch.equal(fused.foreground, materialised.foreground)

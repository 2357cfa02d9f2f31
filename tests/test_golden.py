"""Golden numbers of the ``official`` preset, computed once by the authors' code (SmilesDZgk/S-CFG).

tests/golden/official_sd15.json holds, for a few seeded SD1.5-shaped steps at 512 px, what the
authors' ``get_mask`` and their pipeline's guidance block produced: the token labels on the 16x16
grid, the foreground mask, the rate map (statistics, row and column means, single pixels) and the
guided ε. Only numbers came from their code (it has no licence); the inputs are regenerated here
from the seeds and go through our core three ways: through ``StepCapture`` from raw q/k, as a host
adapter drives it, through the function-level API, and through ``StepCapture`` on the fused SDPA
path a GPU takes.

Inputs are reproducible bit for bit on any x86 CPU: ``torch.rand`` from a CPU ``torch.Generator``,
combined with +, -, *, / only (see ``_Draw``). Layout: SD1.5 at 512 px in diffusers row order (uncond
rows first), the transformer blocks at latent/4 (down_blocks.2: 2, up_blocks.1: 3, 16x16) and latent/8
(mid_block: 1, 8x8), 8 heads of 160, 77-token contexts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from scfg_ext import (
    Pair,
    StepCapture,
    combine,
    head_mean_probs,
    make_params,
    rate_map,
    refine_streamed,
    semantic_masks,
)

from .synthetic import fused_path

GOLDEN = Path(__file__).parent / "golden" / "official_sd15.json"

F64 = torch.float64
HEADS, DIM, CONTEXT = 8, 1280, 77
LATENT = (64, 64)
# UNet order of the captured blocks: down_blocks.2.attentions.{0,1}, mid_block, up_blocks.1.attentions.{0,1,2}
LAYER_SIZES = [(16, 16), (16, 16), (8, 8), (16, 16), (16, 16), (16, 16)]
CONCEPTS = 5  # concept 0 is the background
WORD_CONCEPTS = [1, 2, 3, 4, 1, 0]  # positions 1..6 of the cond prompt; 7 is EOS, 8..76 padding
PROTO = 1.3416407864998738  # 0.6·√5: concept prototypes on 1/5 of the channels, as strong as dense 0.6

# Tolerances against the authors' fp32 numbers (other summation orders, our EPS placement).
RATE_RTOL, RATE_ATOL = 1e-4, 1e-5
GUIDED_RTOL, GUIDED_ATOL = 1e-4, 1e-5


# ----------------------------------------------------------------------------------- inputs


class _Draw:
    """Uniform draws from one seeded CPU generator, in a fixed order.

    ``torch.rand`` turns the generator's bits into floats exactly (no transcendental function, no
    vectorised variant), and everything below combines draws with +, -, * and / only, so the
    inputs are the same bits on every x86 CPU.
    """

    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)

    def rand(self, *shape) -> torch.Tensor:
        """U[0, 1) in float64, for the few layout parameters."""
        return torch.rand(*shape, generator=self.g, dtype=F64)

    def noise(self, *shape) -> torch.Tensor:
        """Zero-mean float32 noise of unit variance: U[-√3, √3)."""
        return (torch.rand(*shape, generator=self.g) - 0.5) * SQRT12


SQRT12 = 3.4641016151377544  # √12 as a float literal, not computed at run time


def _mix(weights: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """Σ_j weights[j, :, None] · dense(vectors)[j] for interleaved concept channels, [N, K·d].

    Concept j owns channels j, j+K, j+2K, ... (vectors: [K, d]), so every head sees every concept
    and the sum has a single non-zero term per channel: no summation order to depend on.
    """
    return (weights.T[:, None, :] * vectors.T[None]).reshape(weights.shape[1], -1)


def _total(x: torch.Tensor) -> torch.Tensor:
    """x[0] + x[1] + ... in that order (a reduction kernel may group the terms by CPU)."""
    out = x[0]
    for part in x[1:]:
        out = out + part
    return out


def _dense(vectors: torch.Tensor) -> torch.Tensor:
    """[K, d] concept vectors -> [K, K·d], each on its own interleaved channels."""
    k = vectors.shape[0]
    return _mix(torch.eye(k), vectors).reshape(k, -1)


def _soft_layout(centers: torch.Tensor, radii: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Soft assignment [K, h*w] (float32) of each pixel to the concepts, rational functions only."""
    ys = (torch.arange(h, dtype=F64) + 0.5) / h
    xs = (torch.arange(w, dtype=F64) + 0.5) / w
    dy = ys[None, :, None] - centers[:, 0, None, None]
    dx = xs[None, None, :] - centers[:, 1, None, None]
    t = (dy * dy + dx * dx) / (radii * radii)[:, None, None]
    weight = 1 / (1 + t * t)
    weight[0] = 0.25  # the background concept: constant
    weight = weight * weight
    weight = weight * weight
    return (weight / _total(weight)).reshape(CONCEPTS, h * w).float()


def make_inputs(seed: int, batch: int) -> dict:
    """One step's raw attention q/k per layer and the ε predictions of ``batch`` images.

    Each image has a background and four blob-shaped concepts; queries mix per-layer concept
    prototypes by a soft layout, the cond prompt's words 1..6 carry the prototypes of
    ``WORD_CONCEPTS``, START carries a bias every query shares, and ‖c − u‖ varies by concept.
    Rows are in diffusers order, [uncond_0..uncond_{B-1}, cond_0..cond_{B-1}]. Returns
    {"layers": [(size, self_q, self_k, cross_q, cross_k)], "uncond": [B,4,64,64], "cond": ...},
    all float32.
    """
    draw = _Draw(seed)
    centers = 0.15 + 0.7 * draw.rand(batch, CONCEPTS, 2)
    radii = 0.12 + 0.18 * draw.rand(batch, CONCEPTS)
    alpha = (0.5 + 0.5 * draw.rand(batch, len(WORD_CONCEPTS))).float()
    pad_mix = (0.05 + 0.3 * draw.rand(2, batch, CONTEXT)).float()  # uncond / cond, non-word positions
    spread = draw.rand(batch, CONCEPTS)
    amps = (0.25 + 3.75 * spread * spread).float()  # the scale of ‖c − u‖ per concept, 0.25..4
    layouts = {size: [_soft_layout(centers[b], radii[b], *size) for b in range(batch)]
               for size in set(LAYER_SIZES)}
    # Layers differ in how strongly each word and START are attended (as UNet blocks do), so that
    # normalising per layer and normalising the layer mean give different maps.
    gains = (0.3 + 1.4 * draw.rand(len(LAYER_SIZES), len(WORD_CONCEPTS))).float()
    start_gains = (0.5 + 0.6 * draw.rand(len(LAYER_SIZES))).tolist()
    layers = []
    for layer, size in enumerate(LAYER_SIZES):
        n = size[0] * size[1]
        self_q, self_k, cross_q, cross_k = [], [], [], []
        for kind in (0, 1):  # uncond, cond
            for b in range(batch):
                a = layouts[size][b]
                # One image's two rows share the layer's feature prototypes.
                proto = draw.noise(CONCEPTS, DIM // CONCEPTS) * PROTO
                cproto = draw.noise(CONCEPTS, DIM // CONCEPTS) * PROTO
                bias = draw.noise(DIM)
                mixed = _mix(a, proto)
                self_q.append(mixed + draw.noise(n, DIM) * 0.3)
                self_k.append(mixed + draw.noise(n, DIM) * 0.3)
                cross_q.append(_mix(a, cproto) + bias * 0.5 + draw.noise(n, DIM) * 0.3)
                dense = _dense(cproto)
                keys = draw.noise(CONTEXT, DIM) * 0.3
                keys[0] = keys[0] + bias * start_gains[layer]  # START: a large, nearly uniform logit
                keys[1:] = keys[1:] + pad_mix[kind, b, 1:, None] * _total(dense[1:])
                if kind == 1:
                    for i, concept in enumerate(WORD_CONCEPTS):
                        keys[1 + i] = keys[1 + i] + alpha[b, i] * gains[layer, i] * dense[concept]
                cross_k.append(keys)
        layers.append((size, *(torch.stack(x) for x in (self_q, self_k, cross_q, cross_k))))
    uncond = draw.noise(batch, 4, *LATENT)
    amp = torch.stack([_total(_soft_layout(centers[b], radii[b], *LATENT) * amps[b][:, None])
                       for b in range(batch)]).reshape(batch, 1, *LATENT)
    cond = uncond + amp * draw.noise(batch, 4, *LATENT)
    return {"layers": layers, "uncond": uncond, "cond": cond}


# ------------------------------------------------------------------------------- our core


def ours_capture(inputs: dict, batch: int, gamma: float, preset: str = "official") -> dict:
    """Our result through ``StepCapture`` from raw q/k, as a host adapter feeds it (one call per block)."""
    capture = StepCapture(make_params(preset=preset), (16, 16), len(inputs["layers"]))
    rows = tuple(range(2 * batch))
    for block, (size, self_q, self_k, cross_q, cross_k) in enumerate(inputs["layers"]):
        capture.self_attention(block, rows, self_q, self_k, HEADS, None)
        capture.cross_attention(block, rows, cross_q, cross_k, HEADS, None, size)
    pairs = [Pair(batch + i, i, gamma) for i in range(batch)]
    result = capture.result(pairs, inputs["cond"], inputs["uncond"])
    return {"labels": result.labels, "foreground": result.foreground[:, 0], "rate": result.rate[:, 0],
            "guided": combine(inputs["cond"], inputs["uncond"], gamma, result.rate)}


def ours_functions(inputs: dict, batch: int, gamma: float, preset: str = "official") -> dict:
    """The same through the function-level API: head means, streamed refinement, masks, rates."""
    cond_maps, uncond_maps, sizes = [], [], []
    for size, self_q, self_k, cross_q, cross_k in inputs["layers"]:
        cross = head_mean_probs(cross_q, cross_k, HEADS)
        refined = refine_streamed(self_q, self_k, cross, HEADS, mode=preset)
        uncond_maps.append(refined[:batch])
        cond_maps.append(refined[batch:])
        sizes.append(size)
    masks, fg = semantic_masks(cond_maps, uncond_maps, sizes, preset)
    rate = rate_map(masks, fg, inputs["cond"], inputs["uncond"], gamma)
    return {"labels": masks.argmax(1), "foreground": fg[:, 0], "rate": rate[:, 0],
            "guided": combine(inputs["cond"], inputs["uncond"], gamma, rate)}


# ----------------------------------------------------------------------------- the tests

DOC = json.loads(GOLDEN.read_text())
CASES = DOC["cases"]
def ours_fused(inputs: dict, batch: int, gamma: float, preset: str = "official") -> dict:
    """``ours_capture`` on the fused SDPA path a GPU takes (forced here; SDPA's math on the CPU)."""
    with fused_path():
        return ours_capture(inputs, batch, gamma, preset)


PATHS = {"capture": ours_capture, "functions": ours_functions, "fused": ours_fused}
_INPUTS: dict = {}
_RESULTS: dict = {}


def _inputs(case: dict) -> dict:
    if case["name"] not in _INPUTS:
        _INPUTS[case["name"]] = make_inputs(case["seed"], case["batch"])
    return _INPUTS[case["name"]]


def _ours(case: dict, path: str) -> dict:
    key = (case["name"], path)
    if key not in _RESULTS:
        _RESULTS[key] = PATHS[path](_inputs(case), case["batch"], case["gamma"])
    return _RESULTS[key]


def _grid_diff(ours: torch.Tensor, expected: list, skip: list[int]) -> list[tuple[int, int, int, int]]:
    """(y, x, ours, expected) of the 16x16 pixels that differ, outside ``skip``."""
    flat = ours.flatten().tolist()
    return [(i // 16, i % 16, flat[i], expected[i]) for i in range(len(expected))
            if i not in skip and flat[i] != expected[i]]


def _close(name: str, ours, expected, rtol: float, atol) -> None:
    ours = torch.as_tensor(ours, dtype=F64).flatten()
    expected = torch.tensor(expected, dtype=F64).flatten()
    tol = atol + rtol * expected.abs()
    bad = ((ours - expected).abs() > tol).nonzero().flatten().tolist()
    assert not bad, (f"{name}: {len(bad)} of {expected.numel()} values off, worst |Δ| = "
                     f"{float((ours - expected).abs().max()):.3g} (tolerance up to "
                     f"{float(torch.as_tensor(tol).max()):.3g}); first: "
                     + ", ".join(f"[{i}] {float(ours[i]):.7g} != {float(expected[i]):.7g}" for i in bad[:4]))


ids = [c["name"] for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_inputs_are_the_golden_inputs(case):
    """The generator still yields the inputs the golden numbers came from (else regenerate them)."""
    x = _inputs(case)
    sums = {"self_q": 1, "self_k": 2, "cross_q": 3, "cross_k": 4}
    for name, expected in case["input_sums"].items():
        tensors = [layer[sums[name]] for layer in x["layers"]] if name in sums else [x[name]]
        got = sum(float(t.double().square().sum()) for t in tensors)
        assert got == pytest.approx(expected, rel=1e-9), f"input {name} changed"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", CASES, ids=ids)
def test_official_labels_and_foreground_match_the_authors(case, path):
    """Token regions (argmax over all 77 positions, cond rows) and eq. 14 foreground (uncond rows)."""
    ours = _ours(case, path)
    for b, image in enumerate(case["images"]):
        counts = torch.bincount(ours["labels"][b].flatten(), minlength=CONTEXT)
        diff = _grid_diff(ours["labels"][b], image["labels"], image["label_near_ties"])
        ours_counts = {i: c for i, c in enumerate(counts.tolist()) if c}
        assert not diff, (f"image {b}: {len(diff)} token labels differ from the authors' (y, x, ours, "
                          f"theirs): {diff[:8]}; our counts {ours_counts} vs {image['label_counts']}")
        fg = [int(c) for c in image["foreground"]]
        diff = _grid_diff(ours["foreground"][b].long(), fg, image["foreground_near_ties"])
        assert not diff, (f"image {b}: {len(diff)} foreground pixels differ (y, x, ours, theirs): "
                          f"{diff[:8]}; {int(ours['foreground'][b].sum())} vs {image['foreground_count']}")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", CASES, ids=ids)
def test_official_rate_map_matches_the_authors(case, path):
    """Eq. 13 with the clamps [0.8, 3], γ·r ≤ 15, then the 3x3 smoothing, at 64x64."""
    ours = _ours(case, path)
    for b, image in enumerate(case["images"]):
        rate, golden = ours["rate"][b].double(), image["rate"]
        stats = [rate.min(), rate.mean(), rate.max()]
        _close(f"image {b} rate min/mean/max", stats, [golden[k] for k in ("min", "mean", "max")],
               RATE_RTOL, RATE_ATOL)
        _close(f"image {b} rate row means", rate.mean(1), golden["row_means"], RATE_RTOL, RATE_ATOL)
        _close(f"image {b} rate column means", rate.mean(0), golden["col_means"], RATE_RTOL, RATE_ATOL)
        _close(f"image {b} rate pixels", [rate[y, x] for y, x, _ in golden["pixels"]],
               [v for _, _, v in golden["pixels"]], RATE_RTOL, RATE_ATOL)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", CASES, ids=ids)
def test_official_guided_output_matches_the_authors(case, path):
    """Eq. 12, u + γ·r ⊙ (c − u); tolerance relative to the size of the terms |u| + γ·r·|c − u|."""
    ours, x, gamma = _ours(case, path), _inputs(case), case["gamma"]
    for b, image in enumerate(case["images"]):
        golden = image["guided"]
        u, c = x["uncond"][b].double(), x["cond"][b].double()
        terms = u.abs() + gamma * ours["rate"][b].double() * (c - u).abs()
        guided = ours["guided"][b].double()
        pix = golden["pixels"]
        tol = torch.tensor([GUIDED_ATOL + GUIDED_RTOL * float(terms[ch, y, x_]) for ch, y, x_, _ in pix])
        _close(f"image {b} guided pixels", [guided[ch, y, x_] for ch, y, x_, _ in pix], [v for *_, v in pix],
               0.0, tol)
        _close(f"image {b} guided channel means", guided.mean((1, 2)), golden["channel_means"], 0.0,
               GUIDED_ATOL + GUIDED_RTOL * terms.mean((1, 2)))
        _close(f"image {b} guided |max|", [guided.abs().max()], [golden["abs_max"]], GUIDED_RTOL, GUIDED_ATOL)

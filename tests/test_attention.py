import math
from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from scfg_ext import attention, head_mean_probs, power_weights, refine, refine_streamed
from scfg_ext.attention import split_heads
from scfg_ext.levels import level_of_tokens


def probs(*shape, seed=0, sharp=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(*shape, generator=g) * sharp, -1)


def reference_head_mean(q, k, heads, scale):
    qh, kh = split_heads(q, heads), split_heads(k, heads)
    return torch.softmax(qh @ kh.transpose(-1, -2) * scale, -1).mean(1)


def test_power_weights():
    assert power_weights("official") == [0.25, 0.75]
    assert power_weights("paper", 3) == [1 / 3] * 3
    with pytest.raises(ValueError, match="refine mode"):
        power_weights("bogus")
    with pytest.raises(ValueError, match="steps"):
        power_weights("paper", 0)


def test_official_is_s_plus_three_s_squared():
    s, c = probs(2, 9, 9, seed=1), probs(2, 9, 5, seed=2)
    expected = (s @ c + 3 * (s @ s) @ c) / 4
    torch.testing.assert_close(refine(s, c, mode="official"), expected)
    # R has no effect on the authors' form
    torch.testing.assert_close(refine(s, c, steps=7, mode="official"), expected)


@given(n=st.integers(1, 12), L=st.integers(1, 6), R=st.integers(1, 6), seed=st.integers(0, 99))
def test_paper_is_mean_of_powers(n, L, R, seed):
    s, c = probs(1, n, n, seed=seed).double(), probs(1, n, L, seed=seed + 1).double()
    expected = sum(torch.linalg.matrix_power(s[0], r) @ c[0] for r in range(1, R + 1)) / R
    # refine computes in fp32 whatever comes in
    torch.testing.assert_close(refine(s, c, steps=R, mode="paper")[0], expected, atol=1e-6, rtol=1e-5)


def test_refined_rows_stay_distributions():
    # S is row-stochastic, so every power keeps each pixel's token distribution summing to 1
    out = refine(probs(3, 16, 16), probs(3, 16, 7), steps=4, mode="paper")
    torch.testing.assert_close(out.sum(-1), torch.ones(3, 16))


def head_blocks(per_head: bool):
    """Build head-mean probabilities as on the CPU (one head at a time) or a GPU (all heads)."""
    return mock.patch.object(attention, "_one_head_at_a_time", lambda device: per_head)


BOTH_WAYS = pytest.mark.parametrize("per_head", [True, False], ids=["one head at a time", "all heads"])


@BOTH_WAYS
@given(rows=st.integers(1, 3), n=st.integers(1, 40), heads=st.sampled_from([1, 2, 4]),
       d=st.sampled_from([2, 8]), seed=st.integers(0, 999))
def test_head_mean_probs_matches_reference_in_chunks(per_head, rows, n, heads, d, seed):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(rows, n, heads * d, generator=g), torch.randn(rows, 5, heads * d, generator=g)
    expected = reference_head_mean(q, k, heads, d ** -0.5)
    for budget in (1, 4 * rows * heads * 5 * 3, 2**30):  # one query, a few queries, all at once
        with head_blocks(per_head):
            torch.testing.assert_close(head_mean_probs(q, k, heads, None, budget), expected)


def test_cpu_blocks_stay_cache_sized(monkeypatch):
    """On the CPU no logits block exceeds CPU_BLOCK_BYTES, whatever the budget allows."""
    seen = []
    real = torch.matmul
    monkeypatch.setattr(torch, "matmul", lambda a, b: seen.append(real(a, b)) or seen[-1])
    n = 1024
    q = torch.randn(2, n, 2 * 8)
    head_mean_probs(q, q, 2, None, budget_bytes=2**30)
    assert seen and all(t.numel() * 4 <= attention.CPU_BLOCK_BYTES for t in seen)
    assert sum(t.shape[-2] for t in seen) == 2 * 2 * n  # every query of every row and head once


def refinement_case(rows, n, heads, L, mode, R, seed):
    """Random self-attention q/k, a cross map C and the dense refinement of C (eq. 10)."""
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(rows, n, heads * 4, generator=g), torch.randn(rows, n, heads * 4, generator=g)
    c = torch.softmax(torch.randn(rows, n, L, generator=g), -1)
    return q, k, c, refine(reference_head_mean(q, k, heads, 0.5), c, steps=R, mode=mode)


@BOTH_WAYS
@given(rows=st.integers(1, 3), n=st.integers(2, 36), heads=st.sampled_from([1, 3]),
       L=st.integers(1, 9), mode=st.sampled_from(["official", "paper"]), R=st.integers(1, 5),
       seed=st.integers(0, 999))
def test_streamed_equals_dense(per_head, rows, n, heads, L, mode, R, seed):
    """Property 8: the streamed refinement equals the dense one to float tolerance."""
    q, k, c, dense = refinement_case(rows, n, heads, L, mode, R, seed)
    with head_blocks(per_head):
        materialised = refine_streamed(q, k, c, heads, 0.5, R, mode, budget_bytes=2**30)
        streamed = refine_streamed(q, k, c, heads, 0.5, R, mode, budget_bytes=4 * rows * heads * n * 2)
    torch.testing.assert_close(materialised, dense)
    torch.testing.assert_close(streamed, dense)


@BOTH_WAYS
def test_streamed_never_builds_a_full_self_map(per_head, monkeypatch):
    """Under a small budget no matmul produces an N×N block: only query chunks."""
    n, heads, budget = 64, 2, 4 * 2 * 64 * 8  # 8 queries of [heads, N] per chunk
    seen = []

    def spy(real):
        def product(a, b):
            out = real(a, b)
            seen.append(out.shape)
            return out
        return product

    monkeypatch.setattr(torch, "matmul", spy(torch.matmul))  # one head at a time
    monkeypatch.setattr(torch, "bmm", spy(torch.bmm))  # all heads at once
    monkeypatch.setattr(attention, "_one_head_at_a_time", lambda device: per_head)
    q = torch.randn(1, n, heads * 4)
    refine_streamed(q, q.clone(), probs(1, n, 5), heads, None, 4, "paper", budget_bytes=budget)
    logits = [s for s in seen if s[-1] == n]
    assert logits and all(s[-2] <= 8 for s in logits)


@BOTH_WAYS
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_give_half_logits_on_a_gpu_only(per_head, dtype, monkeypatch):
    """All heads at once (the GPU way) keeps half q/k for the logits; one head at a time (the CPU
    way) computes them in fp32. Either way the head mean comes back fp32 and close to fp32 math."""
    seen = []
    for name in ("matmul", "bmm"):  # the logits' products, one head at a time / all heads at once
        real = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda a, b, real=real: seen.append(real(a, b)) or seen[-1])
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 64, 4 * 16, generator=g), torch.randn(2, 64, 4 * 16, generator=g)
    with head_blocks(per_head):
        out = head_mean_probs(q.to(dtype), k.to(dtype), 4)
    assert out.dtype == torch.float32
    assert {t.dtype for t in seen} == {torch.float32 if per_head else dtype}
    expected = reference_head_mean(q.to(dtype).float(), k.to(dtype).float(), 4, 16 ** -0.5)
    tol = 2e-3 if dtype == torch.float16 else 1.5e-2
    torch.testing.assert_close(out, expected, atol=tol * expected.max().item(), rtol=0)


def test_half_precision_in_fp32_inside():
    q, k = torch.randn(2, 16, 32), torch.randn(2, 16, 32)
    c = probs(2, 16, 6)
    out = refine_streamed(q.half(), k.half(), c.half(), 4, None, 4, "paper")
    assert out.dtype == torch.float16
    ref = refine_streamed(q.half().float(), k.half().float(), c.half().float(), 4, None, 4, "paper")
    torch.testing.assert_close(out.float(), ref, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("h,w", [(64, 64), (64, 96), (125, 125), (65, 17)])
def test_level_of_tokens_non_square(h, w):
    for f in (1, 2, 4, 8):
        size = (math.ceil(h / f), math.ceil(w / f))
        assert level_of_tokens(h, w, size[0] * size[1]) == size
    assert level_of_tokens(h, w, 7) is None


# ------------------------------------------------------------------- the fused (GPU) path


@given(rows=st.integers(1, 3), n=st.integers(1, 30), t=st.integers(1, 20), heads=st.sampled_from([1, 2, 4]),
       seed=st.integers(0, 999))
def test_fused_cross_probs_are_the_head_mean_padded_with_zeros(rows, n, t, heads, seed):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(rows, n, heads * 8, generator=g), torch.randn(rows, t, heads * 8, generator=g)
    width = attention.fused_width(t)
    assert width % attention.FUSED_ALIGN == 0 and t <= width < t + attention.FUSED_ALIGN
    identity = torch.eye(t, width).expand(rows, heads, t, width)
    q4, k4 = (attention.split_heads_view(x, heads, torch.float32) for x in (q, k))
    probs_padded = attention.fused_cross_probs(q4, k4, identity, 0.3)
    torch.testing.assert_close(probs_padded[..., :t], reference_head_mean(q, k, heads, 0.3))
    assert torch.equal(probs_padded[..., t:], torch.zeros(rows, n, width - t))


@given(rows=st.integers(1, 3), n=st.integers(2, 36), heads=st.sampled_from([1, 3]), L=st.integers(1, 9),
       pad=st.integers(0, 7), mode=st.sampled_from(["official", "paper"]), R=st.integers(1, 5),
       seed=st.integers(0, 999))
def test_fused_refine_equals_dense(rows, n, heads, L, pad, mode, R, seed):
    """S·Y as the head mean of SDPA(q_h, k_h, Y) gives eq. 10's refinement; zero columns stay zero."""
    q, k, c, dense = refinement_case(rows, n, heads, L, mode, R, seed)
    q4, k4 = (attention.split_heads_view(x, heads, torch.float32) for x in (q, k))
    fused = attention.fused_refine(q4, k4, torch.nn.functional.pad(c, (0, pad)), 0.5, R, mode)
    torch.testing.assert_close(fused[..., :L], dense)
    assert torch.equal(fused[..., L:], torch.zeros(rows, n, pad))


def test_the_cpu_has_no_fused_kernel_for_these_shapes():
    """Off a GPU the fused path is never taken (SDPA would run its math, materialising the maps)."""
    q4 = torch.randn(1, 2, 16, 8)
    assert not attention.fused_device(q4.device)
    assert not attention.fused_attention_ok(q4, q4, torch.randn(1, 2, 16, 24))

"""Attention maps and their self-attention refinement (paper §4.1, eq. 10).

Every function here but the fused path's (which takes ``split_heads_view`` views) takes
head-split-free tensors as the WebUIs hand them over: queries and keys are
``[rows, tokens, heads * dim_head]``. Arithmetic is fp32, except that on a
GPU half-precision queries and keys give half-precision logits and softmax (as the attention's own
SDPA computes them) before the head mean, which is taken in fp32 (on the fused path, the kernel's
own fp32 accumulation, and the means in the inputs' dtype). Results come back in the dtype and on
the device of the input maps (fused path: the inputs' dtype).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange

REFINE_MODES = ("official", "paper")

# Above this many bytes for one materialised head-averaged self-attention map (all rows), the
# refinement streams over query chunks instead, recomputing S for every power. 64 MiB holds SD1.5
# and SDXL's 32x32 level easily (2 rows x 1024^2 x 4 B = 8 MiB) and streams SDXL's 64x64 level.
DEFAULT_BUDGET_BYTES = 64 * 2**20
# What ``device_budget`` grants: on the CPU, holding S once was 2.3x faster than streaming it twice
# at N = 4096 (SDXL 2048² or a latent/2 level; one thread), and RAM is plentiful; on a GPU a share
# of the memory free at the start of the pass.
CPU_BUDGET_BYTES = 512 * 2**20
GPU_BUDGET_SHARE, GPU_BUDGET_MAX = 1 / 8, 2 * 2**30


def device_budget(device) -> int:
    """The budget for S on ``device``, asked once per sampling pass (not per step or block)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(min(max(free * GPU_BUDGET_SHARE, DEFAULT_BUDGET_BYTES), GPU_BUDGET_MAX))
    if device.type == "cpu":
        return CPU_BUDGET_BYTES
    return DEFAULT_BUDGET_BYTES


def power_weights(mode: str, steps: int = 4) -> list[float]:
    """Weights w_r of the refined map  C' = Σ_r w_r · S^r · C  for r = 1, 2, ...

    ``paper``    (eq. 10): w_r = 1/R for r = 1..R.
    ``official`` (the authors' code): (S + 3·S²)/4 whatever R is, since their loop recomputes
                 S@S instead of raising the power.
    """
    if mode == "official":
        return [0.25, 0.75]
    if mode == "paper":
        if steps < 1:
            raise ValueError(f"refinement steps must be >= 1, got {steps}")
        return [1.0 / steps] * steps
    raise ValueError(f"refine mode must be one of {REFINE_MODES}, got {mode!r}")


def refine_with(apply_self: Callable[[torch.Tensor], torch.Tensor], cross_attn: torch.Tensor,
                weights: list[float]) -> torch.Tensor:
    """Σ_r w_r · S^r · C (eq. 10) by Horner's rule: S·(w_1·C + S·(w_2·C + … S·(w_R·C))).

    Only products S·Y are taken, never S·S. With the tail sums a_r = Σ_{j≥r} w_j each bracket is
    a_r · U_r, U_R = C and U_r = lerp(C, S·U_{r+1}, a_{r+1}/a_r): one product and one lerp per
    power, and C' = a_1 · S·U_1 (a_1 = 1 for both modes' weights).
    """
    tails = [sum(weights[r:]) for r in range(len(weights))]
    u = cross_attn
    for r in range(len(weights) - 2, -1, -1):
        u = torch.lerp(cross_attn, apply_self(u), tails[r + 1] / tails[r])
    refined = apply_self(u)
    return refined if tails[0] == 1.0 else refined.mul_(tails[0])


def refine(self_attn: torch.Tensor, cross_attn: torch.Tensor, steps: int = 4,
           mode: str = "official") -> torch.Tensor:
    """Refine cross-attention with self-attention (eq. 10), dense form.

    self_attn:  [rows, N, N] head-averaged self-attention probabilities S.
    cross_attn: [rows, N, L] head-averaged cross-attention probabilities C.
    Returns C' [rows, N, L] in ``cross_attn``'s dtype.
    """
    weights = power_weights(mode, steps)
    s = self_attn.float()
    out = refine_with(lambda y: torch.bmm(s, y), cross_attn.float(), weights)
    return out.to(cross_attn.dtype)


def split_heads(x: torch.Tensor, heads: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[rows, T, heads*d] -> [rows, heads, T, d] in ``dtype``."""
    return rearrange(x.to(dtype), "b t (h d) -> b h t d", h=heads)


# On the CPU a [rows, heads, chunk, T] logits block per chunk is memory-bound (the matmul, the
# softmax and the head mean each stream it through RAM): one head's block of about L2 size at a time
# is 3x faster at SDXL's 32x32 level, faster than the attention's own SDPA. On a GPU one big block
# per chunk saves kernel launches instead.
CPU_BLOCK_BYTES = 2**20


def _one_head_at_a_time(device: torch.device) -> bool:
    return device.type == "cpu"


def _query_chunk(bytes_per_query: int, budget_bytes: int) -> int:
    """How many queries fit ``budget_bytes`` (at least one)."""
    return max(1, budget_bytes // max(bytes_per_query, 1))


def _head_mean_chunks(qh: torch.Tensor, kt: torch.Tensor, heads: int, budget_bytes: int):
    """Yield (i, mean_h softmax(q_h · k_hᵀ)[:, i:i+m]) over query chunks, each [rows, m, T] fp32.

    qh: [rows·heads, N, d] (scale folded in), kt: [rows·heads, d, T], both contiguous so that each
    product is one bmm.
    """
    n, t = qh.shape[1], kt.shape[-1]
    rows = qh.shape[0] // heads
    if not _one_head_at_a_time(qh.device):
        chunk = _query_chunk(rows * heads * t * 4, budget_bytes)
        for i in range(0, n, chunk):
            logits = torch.bmm(qh if chunk >= n else qh[:, i:i + chunk], kt)
            yield i, logits.softmax(-1).view(rows, heads, -1, t).mean(1, dtype=torch.float32)
        return
    # held per query: the [rows, m, T] sum, one head's logits and its softmax
    chunk = min(_query_chunk((rows + 2) * t * 4, budget_bytes), _query_chunk(t * 4, CPU_BLOCK_BYTES))
    for i in range(0, n, chunk):
        acc = qh.new_zeros(rows, min(chunk, n - i), t)
        for r in range(rows):
            for h in range(heads):
                acc[r].add_(torch.matmul(qh[r * heads + h, i:i + chunk], kt[r * heads + h]).softmax(-1))
        yield i, acc.div_(heads)


def head_mean_probs(q: torch.Tensor, k: torch.Tensor, heads: int, scale: float | None = None,
                    budget_bytes: int = DEFAULT_BUDGET_BYTES, upcast: bool = False) -> torch.Tensor:
    """mean_h softmax(q_h · k_hᵀ · scale): head-averaged attention probabilities.

    q: [rows, N, heads*d], k: [rows, T, heads*d]  ->  [rows, N, T] fp32.
    Per-head probabilities exist only for a chunk of queries at a time. ``upcast``: fp32 logits
    whatever the dtype of q/k.
    """
    qh, kt = _scaled_queries_and_keys(q, k, heads, scale, upcast)
    n = qh.shape[1]
    chunks = _head_mean_chunks(qh, kt, heads, budget_bytes)
    first = next(chunks)[1]
    if first.shape[1] == n:  # one chunk: no copy
        return first
    out = torch.empty(first.shape[0], n, kt.shape[-1], device=qh.device)
    out[:, :first.shape[1]] = first
    for i, probs in chunks:
        out[:, i:i + probs.shape[1]] = probs
    return out


def logits_dtype(q: torch.Tensor, upcast: bool = False) -> torch.dtype:
    """fp16/bf16 stay so on a GPU: the N×N logits are the cost there (memory traffic), and the
    UNet's attention itself works at that precision, unless the host upcasts its attention to
    fp32 (SD2.x overflows in fp16). The CPU path is fp32."""
    half = q.dtype in (torch.float16, torch.bfloat16)
    return q.dtype if half and not upcast and not _one_head_at_a_time(q.device) else torch.float32


def _scaled_queries_and_keys(q, k, heads, scale, upcast=False):
    """[rows·heads, N, d] queries with the softmax scale folded in (cheaper than scaling N×T
    logits) and [rows·heads, d, T] keys, in the logits' dtype, each made contiguous once."""
    dtype = logits_dtype(q, upcast)
    rows, n, inner = q.shape
    d = inner // heads
    scale = d ** -0.5 if scale is None else scale
    qh = (q.to(dtype) * scale).view(rows, n, heads, d).transpose(1, 2).reshape(rows * heads, n, d)
    kt = k.to(dtype).view(rows, k.shape[1], heads, d).permute(0, 2, 3, 1).reshape(rows * heads, d, -1)
    return qh, kt


def _streamed_self_product(qh: torch.Tensor, kt: torch.Tensor, heads: int,
                           budget_bytes: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Y ↦ S·Y with S = mean_h softmax(q_h k_hᵀ) (scale folded into q), S recomputed in query chunks."""
    def apply(y: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(y)
        for i, probs in _head_mean_chunks(qh, kt, heads, budget_bytes):
            out[:, i:i + probs.shape[1]] = torch.bmm(probs, y)
        return out
    return apply


def refine_streamed(q: torch.Tensor, k: torch.Tensor, cross_attn: torch.Tensor, heads: int,
                    scale: float | None = None, steps: int = 4, mode: str = "official",
                    budget_bytes: int = DEFAULT_BUDGET_BYTES, upcast: bool = False) -> torch.Tensor:
    """Refine cross-attention (eq. 10) from the self-attention's queries and keys.

    q, k:       [rows, N, heads*d] self-attention queries and keys of one block.
    cross_attn: [rows, N, L] head-averaged cross-attention probabilities of the same block.
    Never holds an N×N map larger than ``budget_bytes``: when S for all rows fits, it is built
    once (query-chunked) and reused for every power; otherwise each product S·Y recomputes S
    chunk by chunk. Returns [rows, N, L] in ``cross_attn``'s dtype.
    """
    weights = power_weights(mode, steps)
    rows, n, _ = q.shape
    if n * n * rows * 4 <= budget_bytes:
        s = head_mean_probs(q, k, heads, scale, budget_bytes, upcast)
        out = refine_with(lambda y: torch.bmm(s, y), cross_attn.float(), weights)
        return out.to(cross_attn.dtype)
    qh, kt = _scaled_queries_and_keys(q, k, heads, scale, upcast)
    apply_self = _streamed_self_product(qh, kt, heads, budget_bytes)
    return refine_with(apply_self, cross_attn.float(), weights).to(cross_attn.dtype)


# ---------------------------------------------------------------------------- fused (GPU) path
#
# On a GPU the N×N logits are memory traffic, not arithmetic: materialising S for every head,
# its softmax and its head mean stream ~0.3 GB per SDXL 32x32 block. SDPA's fused kernels never
# write them. S·Y is the head mean of SDPA(q_h, k_h, v = Y), and the cross-attention
# probabilities themselves are SDPA with v = I (P·I = P); the efficient-attention kernel takes
# a value width other than the head width in multiples of 8, so the token axis is padded with
# zero columns, which stay zero through every product and are dropped by the layer fusion.

FUSED_ALIGN = 8


def fused_width(tokens: int) -> int:
    """The token axis padded to the fused kernel's alignment."""
    return -(-tokens // FUSED_ALIGN) * FUSED_ALIGN


def split_heads_view(x: torch.Tensor, heads: int, dtype: torch.dtype) -> torch.Tensor:
    """[rows, T, heads*d] -> [rows, heads, T, d] as a view (SDPA takes strided inputs)."""
    rows, t, inner = x.shape
    return x.to(dtype).view(rows, t, heads, inner // heads).transpose(1, 2)


def fused_device(device: torch.device) -> bool:
    """Devices whose SDPA may have a fused kernel for S-CFG's shapes (checked per shape after)."""
    return device.type == "cuda"


def fused_attention_ok(q4: torch.Tensor, k4: torch.Tensor, v4: torch.Tensor) -> bool:
    """Whether SDPA runs these [rows, heads, T, ·] inputs in one fused kernel on their device
    (CUDA's efficient attention); elsewhere it would materialise the maps, so the caller keeps
    its own blocks. Asked once per shape and generation (``segment.Geometry.once``)."""
    cuda = torch.backends.cuda
    try:
        try:
            params = cuda.SDPAParams(q4, k4, v4, None, 0.0, False, False)
        except TypeError:  # torch < 2.5: no enable_gqa
            params = cuda.SDPAParams(q4, k4, v4, None, 0.0, False)
        return bool(cuda.can_use_efficient_attention(params, False))
    except (AttributeError, RuntimeError, TypeError):
        return False


def fused_head_mean(q4: torch.Tensor, k4: torch.Tensor, values: torch.Tensor,
                    scale: float | None) -> torch.Tensor:
    """mean_h softmax(q_h · k_hᵀ · scale) · V with V [rows, T, E] shared by all heads -> [rows, N, E]."""
    v4 = values[:, None].expand(-1, q4.shape[1], -1, -1)
    return F.scaled_dot_product_attention(q4, k4, v4, scale=scale).mean(1)


def fused_cross_probs(q4: torch.Tensor, k4: torch.Tensor, identity: torch.Tensor,
                      scale: float | None) -> torch.Tensor:
    """Head-averaged cross-attention probabilities C [rows, N, fused_width(T)], zero past T.

    identity: [rows, heads, T, fused_width(T)], the padded identity as values, kept per generation.
    """
    return F.scaled_dot_product_attention(q4, k4, identity, scale=scale).mean(1)


def fused_refine(q4: torch.Tensor, k4: torch.Tensor, cross_attn: torch.Tensor, scale: float | None,
                 steps: int = 4, mode: str = "official") -> torch.Tensor:
    """Eq. 10 with every S·Y a fused SDPA: no N×N map exists, whatever N (q4/k4 by
    ``split_heads_view``; cross_attn [rows, N, E] in their dtype). Returns [rows, N, E]."""
    weights = power_weights(mode, steps)
    return refine_with(lambda y: fused_head_mean(q4, k4, y, scale), cross_attn, weights)


def peak_bytes(rows: int, n: int, heads: int, context: int,
               budget_bytes: int = DEFAULT_BUDGET_BYTES) -> int:
    """Upper bound of the extra memory one block's refinement holds at once (for VRAM reservation)."""
    maps = 3 * rows * n * context * 4  # C, Y and the running sum
    dense = rows * n * n * 4
    return maps + (dense if dense <= budget_bytes else 0) + min(budget_bytes, rows * heads * n * n * 4)

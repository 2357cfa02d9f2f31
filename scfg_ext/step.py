"""One denoising step of S-CFG, independent of the host WebUI.

A host adapter feeds ``StepCapture`` the queries and keys its attention layers see, naming the
rows of its own batch layout, then asks for the rate map of each (cond row, uncond row) pair.
Each block's self-attention is paired with the same block's cross-attention and refined at once,
so only small per-row maps on the mask grid outlive a block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import attention
from .attention import (
    fused_cross_probs,
    fused_refine,
    fused_width,
    head_mean_probs,
    logits_dtype,
    refine_streamed,
    split_heads_view,
)
from .guidance import rate_from_labels
from .params import ScfgParams
from .segment import FusedMaps, Geometry, LayerFusion, chunk_starts, foreground, token_labels


class CaptureError(RuntimeError):
    """The attention seen does not fit the step's layout: S-CFG falls back to plain CFG."""


@dataclass(frozen=True)
class Pair:
    """A cond row, the uncond row of the same image, and its effective scale γ·weight."""
    cond_row: int
    uncond_row: int
    scale: float


@dataclass
class StepResult:
    """What one step produced, for the combiner and for previews (mask grid, low resolution)."""
    rate: torch.Tensor          # [K, 1, H, W] in the predictions' dtype
    labels: torch.Tensor        # [K, h, w] winning token position
    foreground: torch.Tensor    # [K, 1, h, w]


class StepCapture:
    """Refined, layer-fused attention maps of one denoising step, keyed by the host's rows.

    upcast: attention logits in fp32 even for half-precision q/k (A1111's "upcast cross
    attention layer to float32", which SD2.x needs in fp16), as the host's own attention does.
    geometry: the generation's constants (kernels, grid weights), kept by the adapter's run.
    budget_bytes: the most one block's self-attention map may hold (default: the device's, see
    ``attention.device_budget``).
    """

    def __init__(self, params: ScfgParams, grid: tuple[int, int], layers: int,
                 budget_bytes: int | None = None, upcast: bool = False,
                 geometry: Geometry | None = None):
        self.params, self.grid, self.layers, self.budget = params, tuple(grid), layers, budget_bytes
        self.upcast, self.geometry = upcast, geometry or Geometry()
        self._self_qk: dict = {}
        self._fusions: dict[tuple[int, ...], LayerFusion] = {}

    def self_attention(self, block, rows: tuple[int, ...], q: torch.Tensor, k: torch.Tensor,
                       heads: int, scale: float | None) -> None:
        """Keep a block's self-attention q/k until its cross-attention arrives."""
        if q.shape[0] != len(rows) or k.shape[1] != q.shape[1]:
            raise CaptureError(f"self-attention of {block}: {q.shape[0]} rows for {len(rows)} expected")
        self._self_qk[block] = (rows, q, k, heads, scale)

    def cross_attention(self, block, rows: tuple[int, ...], q: torch.Tensor, k: torch.Tensor,
                        heads: int, scale: float | None, size: tuple[int, int]) -> None:
        """Refine this block's cross-attention with its self-attention (eq. 10) and fuse it."""
        if self.params.test_fault == "cross_attention":
            raise RuntimeError("injected test fault in cross_attention")
        if self.params.test_fault == "oom":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected test fault)")
        stashed = self._self_qk.pop(block, None)
        if stashed is None or stashed[0] != rows:
            raise CaptureError(f"cross-attention of {block} without its self-attention rows")
        if q.shape[1] != size[0] * size[1] or q.shape[0] != len(rows):
            raise CaptureError(f"cross-attention of {block}: tokens {q.shape[1]} != {size[0]}x{size[1]}")
        _, q1, k1, heads1, scale1 = stashed
        if self.budget is None:
            self.budget = self.geometry.budget(q.device)
        refined = self._fused_refined(q, k, heads, scale, q1, k1, heads1, scale1)
        if refined is None:
            cross = head_mean_probs(q, k, heads, scale, self.budget, self.upcast)
            refined = refine_streamed(q1, k1, cross, heads1, scale1, self.params.refine_power,
                                      self.params.preset, self.budget, self.upcast)
        fusion = self._fusions.get(rows)
        if fusion is None or block in fusion.blocks:
            # A block seen again for the same rows is a later pass over the UNet (ControlNet
            # reference-only runs a nested reference pass first): the last full pass wins.
            # The START positions are read once per fusion from the first layer's keys.
            fusion = LayerFusion(self.params.preset, self.grid, chunk_starts(k), self.geometry)
            self._fusions[rows] = fusion
        fusion.add(refined, size)
        fusion.blocks.add(block)

    def _fused_refined(self, q, k, heads, scale, q1, k1, heads1, scale1) -> torch.Tensor | None:
        """Eq. 10 by fused SDPA calls where the device has the kernel for these shapes (a GPU), as
        [rows, N, fused_width(T)] with zero padding columns; None where it has not."""
        if not attention.fused_device(q.device):
            return None
        dtype = logits_dtype(q, self.upcast)
        q4, k4 = split_heads_view(q, heads, dtype), split_heads_view(k, heads, dtype)
        rows, tokens = k.shape[0], k.shape[1]
        identity = self.geometry.identity(tokens, fused_width(tokens), rows, heads, dtype, q.device)
        s_q4, s_k4 = split_heads_view(q1, heads1, dtype), split_heads_view(k1, heads1, dtype)

        def kernel_takes_them():  # C stands in by a view of the right shape
            values = identity[:, :1, :1].expand(rows, heads1, q1.shape[1], -1)
            return attention.fused_attention_ok(q4, k4, identity) and \
                attention.fused_attention_ok(s_q4, s_k4, values)
        key = (q4.shape, k4.shape, s_q4.shape, dtype, str(q.device))
        if not self.geometry.once(("fused", *key), kernel_takes_them):
            return None
        cross = fused_cross_probs(q4, k4, identity, scale)
        return fused_refine(s_q4, s_k4, cross, scale1, self.params.refine_power, self.params.preset)

    def _gather(self, rows: list[int]) -> FusedMaps:
        """The fused maps of ``rows``, in that order, from the fusions that saw every target layer."""
        complete = {key: fusion.result() for key, fusion in self._fusions.items()
                    if fusion.layers == self.layers}  # one division per fusion, not per row
        index = {row: (key, i) for key in complete for i, row in enumerate(key)}
        missing = [row for row in rows if row not in index]
        if missing:
            raise CaptureError(f"rows {missing} were not captured at every target layer")
        lengths = {complete[index[row][0]].tokens.shape[1] for row in rows}
        if len(lengths) != 1:
            raise CaptureError("rows of one kind have different context lengths")

        located = [index[row] for row in rows]

        def stack(name):
            if getattr(complete[located[0][0]], name) is None:
                return None
            return torch.stack([getattr(complete[key], name)[i] for key, i in located])

        return FusedMaps(stack("tokens"), stack("start_rest"), stack("uniform"), stack("start_mask"))

    def result(self, pairs: list[Pair], cond: torch.Tensor, uncond: torch.Tensor) -> StepResult:
        """Rate maps of ``pairs``; cond/uncond are [K, C, H, W], row k belonging to pairs[k]."""
        params = self.params
        if params.test_fault == "result":
            raise RuntimeError("injected test fault in result")
        cond_maps = self._gather([p.cond_row for p in pairs])
        uncond_maps = self._gather([p.uncond_row for p in pairs])
        labels = token_labels(cond_maps, params.preset)
        fg = foreground(cond_maps, uncond_maps, params.preset, params.region)
        scales = [p.scale for p in pairs]
        scale = scales[0] if len(set(scales)) == 1 else cond.new_tensor(scales, dtype=torch.float32)
        rate = rate_from_labels(labels, fg, cond, uncond, scale, cond_maps.tokens.shape[1],
                                params.min_rate, params.max_rate, params.max_scale, params.strength,
                                kernel=self.geometry.kernel(cond.device))
        return StepResult(rate, labels, fg)

"""Semantic segmentation of the latent from refined cross-attention (paper §4.1, eq. 9 and 14).

Two presets:

``official``  reproduces the authors' code: each layer's map is upsampled (bilinear) to the mask
              grid, smoothed with their 3×3 kernel (reflect padding), divided by its spatial mean per
              token, and the layers are averaged. The foreground compares two channels of the
              smoothed, un-normalised maps, [START, sum of every other position], each divided by its
              spatial mean; a pixel is background where START ≥ rest.
``paper``     follows eq. 9 and 14 as printed: layers averaged after upsampling, one spatial
              renormalisation per token (eq. 9), argmax; the background is the region the START
              token wins in that same argmax (eq. 14).

Token regions come from an argmax over all L positions; exact ties go to the first position, so
the regions always partition the pixels (the authors' ``== max`` gives overlapping regions at ties,
which only happen on duplicated tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange

from .levels import finest_grid

PRESETS = ("official", "paper")
REGIONS = ("foreground", "mean")
TOKENS_PER_CHUNK = 77  # [START] + 75 words + [END]; each 75-token chunk is encoded on its own
EPS = 1e-8  # the authors' guard in every spatial mean


def official_kernel_1d(dtype=torch.float32, device=None) -> torch.Tensor:
    """The authors' 3-tap "σ = 0.5" Gaussian: exp(-((x-μ)/(2σ))²), i.e. an effective σ of 0.707."""
    x = torch.arange(3, dtype=dtype, device=device) - 1.0
    g = torch.exp(-((x / (2 * 0.5)) ** 2))
    return g / g.sum()


def smooth3x3(maps: torch.Tensor, kernel: torch.Tensor | None = None) -> torch.Tensor:
    """Separable 3×3 smoothing of [B, C, h, w] with reflect padding (replicate on 1-pixel axes).

    kernel: the 1-D kernel in the maps' dtype and device, when the caller keeps one (``Geometry``).
    """
    g = official_kernel_1d(maps.dtype, maps.device) if kernel is None else kernel
    b, c, h, w = maps.shape
    mode = "reflect" if min(h, w) >= 2 else "replicate"
    x = F.pad(maps.reshape(b * c, 1, h, w), (1, 1, 1, 1), mode=mode)
    x = F.conv2d(x, g.view(1, 1, 1, 3))
    x = F.conv2d(x, g.view(1, 1, 3, 1))
    return x.view(b, c, h, w)


def spatial_normalise(maps: torch.Tensor) -> torch.Tensor:
    """Each channel of [B, C, h, w] divided by its spatial mean (eq. 9 up to the constant h·w)."""
    return maps / (maps.mean((-2, -1), keepdim=True) + EPS)


def start_positions(context_len: int, chunk: int = TOKENS_PER_CHUNK) -> list[int]:
    """START positions of a context made of 77-token chunks: 0, 77, 154, ..."""
    return list(range(0, context_len, chunk))


def chunk_starts(keys: torch.Tensor, chunk: int = TOKENS_PER_CHUNK, rtol: float = 1e-3) -> torch.Tensor:
    """Which positions of each row's context are START tokens, [rows, T] bool.

    keys: [rows, T, E], the cross-attention keys (or the context itself). A chunk begins with
    START, except where the host padded a shorter context to the batch's length: A1111 pads AND
    sub-prompts of unequal length by repeating the last vector, so a "chunk" made of copies of
    the vector before it is padding, not a prompt chunk.
    """
    rows, length, _ = keys.shape
    starts = torch.zeros(rows, length, dtype=torch.bool, device=keys.device)
    starts.select(1, 0).fill_(True)
    for c in range(chunk, length, chunk):
        last = keys[:, c - 1:c].float()
        repeated = (keys[:, c:].float() - last).abs().amax((1, 2)) <= rtol * last.abs().amax((1, 2))
        starts[:, c] = ~repeated
    return starts


def as_start_mask(starts, rows: int, length: int, device=None) -> torch.Tensor:
    """START positions given as one list for all rows, a list per row, or a [rows, T] mask."""
    if isinstance(starts, torch.Tensor):
        return starts.to(device=device, dtype=torch.bool)
    per_row = starts if starts and isinstance(starts[0], (list, tuple)) else [starts] * rows
    mask = torch.zeros(rows, length, dtype=torch.bool, device=device)
    for r, positions in enumerate(per_row):
        mask[r, list(positions)] = True
    return mask


def to_grid(maps: torch.Tensor, size: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """[B, N, L] maps of a (h, w) layer -> [B, L, *grid], bilinear, resized by size not factor."""
    h, w = size
    x = rearrange(maps.float(), "b (h w) l -> b l h w", h=h, w=w)
    if (h, w) != tuple(grid):
        x = F.interpolate(x, size=tuple(grid), mode="bilinear", align_corners=False)
    return x


def start_vs_rest(maps: torch.Tensor, start_mask: torch.Tensor) -> torch.Tensor:
    """[B, L, h, w] -> [B, 2, h, w]: the summed START channels and the sum of all other positions."""
    start = torch.einsum("blhw,bl->bhw", maps, start_mask.to(maps.dtype))[:, None]
    return torch.cat([start, maps.sum(1, keepdim=True) - start], 1)


@dataclass
class FusedMaps:
    """Layer-fused maps of some attention rows on the mask grid.

    tokens: [B, L, h, w]  official: mean over layers of per-layer normalised smoothed maps;
                          paper: mean over layers of the upsampled maps.
    start_rest: [B, 2, h, w] official only: mean over layers of the normalised [START, rest].
    uniform: [B] bool, True where every layer's map was uniform over tokens (zero context).
    start_mask: [B, L] bool, the START positions of each row's context.
    """
    tokens: torch.Tensor
    start_rest: torch.Tensor | None
    uniform: torch.Tensor
    start_mask: torch.Tensor


class Geometry:
    """Constants of a generation's grids, built once and reused by every step and layer: the
    smoothing kernel, and for each layer size the weights w with w·M = the spatial mean of the
    upsampled (and, official, smoothed) map M on the mask grid."""

    def __init__(self):
        self._cache: dict = {}

    def once(self, key, make):
        """``make()``, computed the first time ``key`` is asked for in this generation."""
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def budget(self, device) -> int:
        """The memory budget for one block's self-attention map on ``device``."""
        from .attention import device_budget

        return self.once(("budget", str(device)), lambda: device_budget(device))

    def kernel(self, device) -> torch.Tensor:
        return self.once(("kernel", str(device)), lambda: official_kernel_1d(torch.float32, device))

    def identity(self, tokens: int, width: int, rows: int, heads: int, dtype, device) -> torch.Tensor:
        """[rows, heads, tokens, width] identity padded with zero columns (one matrix, expanded)."""
        return self.once(("identity", tokens, width, rows, heads, dtype, str(device)),
                         lambda: torch.eye(tokens, width, dtype=dtype, device=device).expand(
                             rows, heads, tokens, width))

    def constant(self, value: float, device) -> torch.Tensor:
        """A 0-dim fp32 tensor of ``value`` on ``device`` (an operand that needs no host copy)."""
        return self.once(("constant", value, str(device)), lambda: torch.tensor(value, device=device))

    def mean_weights(self, size: tuple[int, int], grid: tuple[int, int], smooth: bool,
                     device, rows: int = 1) -> torch.Tensor:
        """[rows, 1, h·w] fp32 (one row expanded): upsampling and smoothing are linear, so the grid mean
        of a layer's map is a fixed weighting of its pixels; found by mapping each pixel's indicator
        through them."""
        return self.once(("mean", tuple(size), tuple(grid), smooth, str(device), rows),
                         lambda: self._pixel_weights(size, grid, smooth, device).expand(rows, 1, -1))

    def _pixel_weights(self, size, grid, smooth, device) -> torch.Tensor:
        n = size[0] * size[1]
        weights = torch.empty(n, device=device)
        for i in range(0, n, 256):
            m = min(256, n - i)
            basis = torch.zeros(1, m, n, device=device)
            basis[0, torch.arange(m), torch.arange(i, i + m)] = 1.0
            images = rearrange(basis, "b l (h w) -> b l h w", h=size[0])
            if tuple(size) != tuple(grid):
                images = F.interpolate(images, size=tuple(grid), mode="bilinear", align_corners=False)
            if smooth:
                images = smooth3x3(images, self.kernel(device))
            weights[i:i + m] = images.mean((-2, -1))[0]
        return weights[None, None]


class LayerFusion:
    """Running fusion over attention layers (one call per layer), so no layer's map is kept.

    The authors upsample, smooth and normalise every layer's map, then average the layers. All
    but the normalisation are linear, and the normalisation divides each token by a constant (its
    grid mean, w·M by ``Geometry.mean_weights``): so each layer is divided on its own grid and
    summed per layer size, and the upsampling and smoothing run once per size and step, not once
    per layer. The official [START, rest] channels are two more columns, M·[m_START, 1 − m_START],
    normalised alike.
    """

    def __init__(self, preset: str, grid: tuple[int, int], starts, geometry: Geometry | None = None):
        """starts: START positions, one list for all rows, a list per row or a [B, L] mask."""
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
        self.preset, self.grid, self.starts = preset, tuple(grid), starts
        self.geometry = geometry or Geometry()
        self.start_mask = self._columns = None
        self._sums: dict[tuple[int, int], torch.Tensor] = {}  # layer size -> [B, h·w, C] sum
        self.layers = 0
        self.blocks: set = set()  # names of the blocks folded in, for callers that track them

    def add(self, maps: torch.Tensor, size: tuple[int, int]) -> None:
        """Fold in one layer's refined maps [B, N, L] of spatial size (h, w).

        Maps may carry zero columns past the context's L positions (``attention.fused_width``): they
        are dropped here, by the column matrix or a slice, at no extra copy.
        """
        flat = maps.float()
        if self.start_mask is None:
            self._first_layer(flat)
        rows, length = self.start_mask.shape
        total = self._sums.get(tuple(size))
        if self.preset == "official":
            x = torch.bmm(flat, self._columns)
            weights = self.geometry.mean_weights(size, self.grid, True, flat.device, rows)
            mean = torch.baddbmm(self.geometry.constant(EPS, flat.device), weights, x)  # ε + w·x, [B, 1, C]
            if total is None:  # eq. 9 per layer, as the authors normalise
                self._sums[tuple(size)] = x.div_(mean)
            else:
                total.addcdiv_(x, mean)
        else:
            x = flat[..., :length]
            if total is None:  # the sum grows in place: never in the caller's tensor
                self._sums[tuple(size)] = x.clone()
            else:
                total.add_(x)
        self.layers += 1

    def _first_layer(self, flat: torch.Tensor) -> None:
        """The START mask, and for ``official`` the column matrix [I | m_START | 1 − m_START] (with zero
        rows for padding columns) that maps tokens to tokens, START and rest in one product."""
        rows, width = flat.shape[0], flat.shape[-1]
        length = self.starts.shape[-1] if isinstance(self.starts, torch.Tensor) else width
        self.start_mask = as_start_mask(self.starts, rows, length, flat.device)
        if self.preset == "official":
            start = self.start_mask.float()[:, :, None]
            eye = torch.eye(length, device=flat.device).expand(rows, -1, -1)
            columns = torch.cat([eye, start, 1 - start], -1)
            self._columns = F.pad(columns, (0, 0, 0, width - length))

    def result(self) -> FusedMaps:
        if self.layers == 0:
            raise ValueError("no attention layer was fused")
        fused = None
        for size, total in self._sums.items():
            x = to_grid(total, size, self.grid)
            if self.preset == "official":
                x = smooth3x3(x, self.geometry.kernel(x.device))
            fused = x if fused is None else fused + x
        fused = fused / self.layers
        length = self.start_mask.shape[1]
        tokens = fused[:, :length]
        start_rest = fused[:, length:] if self.preset == "official" else None
        spread = tokens.amax(1) - tokens.amin(1)
        uniform = spread.flatten(1).amax(1) <= 1e-6 * tokens.flatten(1).amax(1)  # zero context
        return FusedMaps(tokens, start_rest, uniform, self.start_mask)


def token_labels(fused: FusedMaps, preset: str) -> torch.Tensor:
    """Per-pixel winning token position [B, h, w] (argmax, first position on ties)."""
    maps = fused.tokens if preset == "official" else spatial_normalise(fused.tokens)
    return maps.argmax(1)


def background(fused: FusedMaps, preset: str) -> torch.Tensor:
    """Eq. 14: the region won by START, [B, 1, h, w] bool."""
    if preset == "official":
        return fused.start_rest[:, :1] >= fused.start_rest[:, 1:]
    mask = fused.start_mask[:, :, None, None]
    start = spatial_normalise(start_vs_rest(fused.tokens, fused.start_mask)[:, :1])
    others = spatial_normalise(fused.tokens).masked_fill(mask, float("-inf")).amax(1, keepdim=True)
    return start >= others  # a context of START tokens only: all background (-inf never wins)


def foreground(cond: FusedMaps, uncond: FusedMaps | None, preset: str, region: str) -> torch.Tensor:
    """Benchmark mask m_b [B, 1, h, w] float: eq. 14 from the uncond rows, or all ones ("mean").

    Where an image's uncond attention is uniform (SDXL's all-zero empty negative prompt), its
    START test says nothing, so that image's foreground comes from its cond row instead.
    """
    if region == "mean":
        return torch.ones_like(cond.tokens[:, :1])
    if region != "foreground":
        raise ValueError(f"region must be one of {REGIONS}, got {region!r}")
    from_cond = ~background(cond, preset)
    if uncond is None:
        return from_cond.float()
    from_uncond = ~background(uncond, preset)
    use_cond = uncond.uniform.view(-1, 1, 1, 1)
    return torch.where(use_cond, from_cond, from_uncond).float()


def one_hot_masks(labels: torch.Tensor, tokens: int) -> torch.Tensor:
    """[B, h, w] labels -> [B, L, h, w] float one-hot masks."""
    return F.one_hot(labels, tokens).permute(0, 3, 1, 2).float()


def fuse(maps: list[torch.Tensor], sizes: list[tuple[int, int]], preset: str,
         grid: tuple[int, int], starts) -> FusedMaps:
    fusion = LayerFusion(preset, grid, starts)
    for layer_maps, size in zip(maps, sizes, strict=True):
        fusion.add(layer_maps, size)
    return fusion.result()


def semantic_masks(cond_maps: list[torch.Tensor], uncond_maps: list[torch.Tensor] | None,
                   sizes: list[tuple[int, int]], preset: str = "official",
                   region: str = "foreground", cond_starts: list[int] | None = None,
                   uncond_starts: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token regions and foreground of a step (§4.1, eq. 9 and 14).

    cond_maps / uncond_maps: one refined map per layer, [B, N_l, L] / [B, N_l, L_u]; row b of the
        uncond list belongs to the same image as row b of the cond list.
    sizes: (h_l, w_l) of each layer, N_l = h_l·w_l.
    cond_starts / uncond_starts: START positions, one list for all rows or a list per row
        (default: every 77th position).
    Returns (token_masks [B, L, h, w], foreground [B, 1, h, w]) on the largest layer's grid, in
    the maps' dtype.
    """
    grid = finest_grid(sizes)
    cond_starts = cond_starts or start_positions(cond_maps[0].shape[-1])
    cond = fuse(cond_maps, sizes, preset, grid, cond_starts)
    uncond = None
    if uncond_maps is not None:
        uncond_starts = uncond_starts or start_positions(uncond_maps[0].shape[-1])
        uncond = fuse(uncond_maps, sizes, preset, grid, uncond_starts)
    labels = token_labels(cond, preset)
    fg = foreground(cond, uncond, preset, region)
    dtype = cond_maps[0].dtype
    return one_hot_masks(labels, cond.tokens.shape[1]).to(dtype), fg.to(dtype)

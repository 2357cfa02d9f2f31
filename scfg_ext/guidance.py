"""Adaptive per-region CFG scale (paper §4.2, eq. 12 and 13).

The rate map r is dimensionless: the effective guidance at a pixel is γ·r. ``cond`` and ``uncond``
may be ε, x0 or v predictions of one model: for one image they differ from ε by the same scalar,
which cancels in every ratio below, and u + γ·r·(c − u) commutes with those affine conversions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .segment import EPS, smooth3x3


def _per_image(value: float | torch.Tensor, batch: int) -> float | torch.Tensor:
    """A Python number as it is (no tensor made from host data), a [B] tensor as [B, 1, 1, 1]."""
    if isinstance(value, torch.Tensor):
        return value.float().reshape(-1, 1, 1, 1).expand(batch, 1, 1, 1) if value.ndim else value.float()
    return float(value)


def guidance_norm(cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
    """η = ‖c − u‖₂ over latent channels (eq. 13): [B, C, H, W] -> [B, H*W] fp32."""
    return torch.linalg.vector_norm((cond.float() - uncond.float()), dim=1).flatten(1)


def region_rates(labels: torch.Tensor, benchmark: torch.Tensor, eta: torch.Tensor,
                 tokens: int) -> torch.Tensor:
    """γ_i/γ of eq. 13 for every token region: mean_b(η) / mean_i(η), [B, L].

    labels:    [B, H*W] winning token per latent pixel; benchmark: [B, H*W] 0/1 mask m_b.
    Regions with no pixel get rate 0 (never used). An empty benchmark gives every region rate 0,
    as in the authors' code, which the clamp then lifts to ``min_rate``.
    """
    bench_mean = (eta * benchmark).sum(1, keepdim=True) / (benchmark.sum(1, keepdim=True) + EPS)
    sums = eta.new_zeros(eta.shape[0], tokens).scatter_add_(1, labels, eta)
    counts = eta.new_zeros(eta.shape[0], tokens).scatter_add_(1, labels, torch.ones_like(eta))
    region_mean = sums / (counts + EPS)
    # A region whose η is exactly 0 has c == u there: its rate is irrelevant but must stay finite.
    rates = bench_mean / region_mean.clamp_min(torch.finfo(torch.float32).tiny)
    return torch.where(counts > 0, rates, torch.zeros_like(rates))


def _to_latent(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest upsampling of a [B, 1, h, w] mask grid to the latent size, by size."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    return F.interpolate(mask, size=tuple(size), mode="nearest")


def rate_from_labels(labels: torch.Tensor, foreground: torch.Tensor, cond: torch.Tensor,
                     uncond: torch.Tensor, cfg_scale: float | torch.Tensor, tokens: int,
                     min_rate: float = 0.8, max_rate: float = 3.0, max_scale: float = 15.0,
                     strength: float = 1.0, smooth: bool = True,
                     kernel: torch.Tensor | None = None) -> torch.Tensor:
    """The rate map r, [B, 1, H, W], from per-pixel token labels [B, h, w] (see ``rate_map``).

    ``strength`` s blends towards plain CFG before the clamps: r ← 1 + s·(r − 1)
    (0 = plain CFG, 1 = the paper, above 1 exaggerates the differences between regions).
    """
    b, _, height, width = cond.shape
    labels = _to_latent(labels[:, None].float(), (height, width)).long().flatten(1)
    bench = _to_latent(foreground.float(), (height, width)).flatten(1)
    eta = guidance_norm(cond, uncond)
    rate = region_rates(labels, bench, eta, tokens).gather(1, labels).view(b, 1, height, width)
    if strength != 1.0:
        rate = 1 + strength * (rate - 1)
    gamma = _per_image(cfg_scale, b)
    if isinstance(gamma, float):  # one scale for every image (no AND weights): plain numbers
        upper = min(max_rate, max_scale / max(abs(gamma), EPS))
        lower = min(min_rate, upper)
        rate = rate.clamp(min_rate, max_rate).clamp(max=upper)
    else:
        cap = max_scale / gamma.abs().clamp_min(EPS)
        upper = cap.clamp(max=max_rate)
        lower = upper.clamp(max=min_rate)
        rate = torch.minimum(rate.clamp(min_rate, max_rate), cap)
    if smooth:
        # Smoothing the deviation from plain CFG keeps r ≡ 1 exactly 1; a convex combination stays
        # inside the clamps, and clamping again only removes float rounding.
        rate = 1 + smooth3x3(rate - 1, kernel)
        rate = rate.clamp(lower, upper) if isinstance(gamma, float) else \
            torch.maximum(torch.minimum(rate, upper), lower)
    return rate.to(cond.dtype)


def rate_map(token_masks: torch.Tensor, foreground: torch.Tensor, cond: torch.Tensor,
             uncond: torch.Tensor, cfg_scale: float | torch.Tensor, min_rate: float = 0.8,
             max_rate: float = 3.0, max_scale: float = 15.0, smooth: bool = True,
             strength: float = 1.0) -> torch.Tensor:
    """The rate map r, [B, 1, H, W] at the latent size (eq. 13 with the authors' clamps).

    token_masks: [B, L, h, w] one-hot regions; foreground: [B, 1, h, w] benchmark mask m_b.
    cond, uncond: [B, C, H, W] predictions; cfg_scale: γ (scalar or [B]), used only for the cap
        γ·r ≤ max_scale. The clamps come before the 3×3 smoothing, as in the authors' code, so
        min_rate ≤ r ≤ min(max_rate, max_scale/γ) holds afterwards (when max_scale/γ ≥ min_rate;
        otherwise the cap wins and r ≡ max_scale/γ).
    """
    labels = token_masks.float().argmax(1)
    return rate_from_labels(labels, foreground, cond, uncond, cfg_scale, token_masks.shape[1],
                            min_rate, max_rate, max_scale, strength, smooth)


def combine(cond: torch.Tensor, uncond: torch.Tensor, cfg_scale: float | torch.Tensor,
            rate: torch.Tensor) -> torch.Tensor:
    """Eq. 12: u + γ·r ⊙ (c − u). With r ≡ 1 this is plain CFG (eq. 7)."""
    gamma = _per_image(cfg_scale, cond.shape[0])
    out = uncond.float() + gamma * rate.float() * (cond.float() - uncond.float())
    return out.to(cond.dtype)


def prescale_cond(cond: torch.Tensor, uncond: torch.Tensor, rate: torch.Tensor) -> torch.Tensor:
    """u + r ⊙ (c − u): a cond prediction that any linear CFG combiner turns into eq. 12.

    A combiner computing u + γ·w·(c' − u) then yields u + γ·w·r·(c − u).
    """
    out = uncond.float() + rate.float() * (cond.float() - uncond.float())
    # where r = 1 the cond must come back bit for bit, not u + (c - u) rounded
    return torch.where(rate == 1, cond, out.to(cond.dtype))


def correction(cond: torch.Tensor, uncond: torch.Tensor, cfg_scale: float | torch.Tensor,
               rate: torch.Tensor) -> torch.Tensor:
    """γ·(r − 1)·(c − u): what turns a plain-CFG result into eq. 12 when added to it."""
    gamma = _per_image(cfg_scale, cond.shape[0])
    return (gamma * (rate.float() - 1) * (cond.float() - uncond.float())).to(cond.dtype)

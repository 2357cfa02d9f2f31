"""Synthetic attention with known semantic regions, shared by the tests."""

from contextlib import contextmanager
from unittest import mock

import torch

from scfg_ext import attention


def region_labels(h, w, layout="quadrants"):
    """[h, w] region index per pixel: 4 quadrants (index 0..3) or left/right halves (0..1)."""
    rows = torch.arange(h)[:, None].expand(h, w)
    cols = torch.arange(w)[None, :].expand(h, w)
    if layout == "halves":
        return (cols >= w // 2).long()
    return (rows >= h // 2).long() * 2 + (cols >= w // 2).long()


def cross_attention(labels, tokens, L, noise=0.0, seed=0):
    """[1, N, L] attention where region r attends only to position tokens[r] (plus noise)."""
    h, w = labels.shape
    maps = torch.full((h * w, L), 1e-4)
    for r, t in enumerate(tokens):
        maps[(labels.flatten() == r), t] = 1.0
    if noise:
        g = torch.Generator().manual_seed(seed)
        maps = maps + noise * torch.rand(maps.shape, generator=g)
    return (maps / maps.sum(-1, keepdim=True))[None]


def block_self_attention(labels):
    """[1, N, N] self-attention uniform within each region: region completion keeps regions."""
    flat = labels.flatten()
    same = (flat[:, None] == flat[None, :]).float()
    return (same / same.sum(-1, keepdim=True))[None]


@contextmanager
def fused_path():
    """Take the fused SDPA path a GPU takes, on any device (on the CPU SDPA runs it as its math)."""
    with mock.patch.object(attention, "fused_device", lambda device: True), \
            mock.patch.object(attention, "fused_attention_ok", lambda q4, k4, v4: True):
        yield

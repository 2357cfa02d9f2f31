"""An FID analogue for bench.quality's shapes: the Fréchet distance between two image sets in the
feature space of a small classifier trained on the data set (our stand-in for Inception-v3).

Classifier: 256² images average-pooled to 64², four 3x3 conv layers (16, 32, 64, FEATURES channels,
stride 2 from the second on, GroupNorm + SiLU), global average pooling -> a FEATURES-d vector, and
linear heads for the background (3 classes) and, per colour, absent / circle / square / triangle /
star (5 classes). Trained on training-split images (seeded, a few CPU minutes), checked on held-out
ones. The distance (Heusel et al. 2017, eq. of FID):

    FD = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))

over the FEATURES-d features; like FID it is biased upwards at small sample sizes, so compare only
sets of equal size.
"""
from __future__ import annotations

import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench.quality import data

FEATURES = 32
COLOURS = list(data.COLOURS)
BACKGROUNDS = list(data.BACKGROUNDS)
SHAPE_CLASS = {s: i + 1 for i, s in enumerate(data.SHAPES)}  # 0 = colour absent


class ShapeNet(nn.Module):
    def __init__(self):
        super().__init__()
        widths = (16, 32, 64, FEATURES)
        layers, c_in = [], 3
        for i, c in enumerate(widths):
            conv = nn.Conv2d(c_in, c, 3, stride=1 if i == 0 else 2, padding=1)
            layers += [conv, nn.GroupNorm(4, c), nn.SiLU()]
            c_in = c
        self.body = nn.Sequential(*layers)
        self.background = nn.Linear(FEATURES, len(BACKGROUNDS))
        self.objects = nn.Linear(FEATURES, len(COLOURS) * (len(data.SHAPES) + 1))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, 256, 256] in [-1, 1] -> [B, FEATURES]."""
        return self.body(F.avg_pool2d(images, 4)).mean((2, 3))

    def forward(self, images: torch.Tensor):
        f = self.features(images)
        return self.background(f), self.objects(f).view(-1, len(COLOURS), len(data.SHAPES) + 1)


def to_input(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def targets(samples) -> tuple[torch.Tensor, torch.Tensor]:
    bg = torch.tensor([BACKGROUNDS.index(s.background) for s in samples])
    obj = torch.zeros(len(samples), len(COLOURS), dtype=torch.long)
    for i, s in enumerate(samples):
        for o in s.objects:
            obj[i, COLOURS.index(o.colour)] = SHAPE_CLASS[o.shape]
    return bg, obj


def accuracy(net: ShapeNet, samples) -> dict:
    with torch.no_grad():
        bg_logits, obj_logits = net(to_input(np.stack([s.image for s in samples])))
    bg, obj = targets(samples)
    return {"background": float((bg_logits.argmax(-1) == bg).float().mean()),
            "colour_shape": float((obj_logits.argmax(-1) == obj).float().mean())}


def train(seed: int = 0, n: int = 3072, epochs: int = 32, batch: int = 64, log=print) -> ShapeNet:
    torch.manual_seed(seed)
    net = ShapeNet()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    samples = [data.sample(seed, 3 * 10 ** 6 + i, "train") for i in range(n)]
    images = to_input(np.stack([s.image for s in samples]))
    bg, obj = targets(samples)
    t0 = time.time()
    for epoch in range(epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        for start in range(0, n, batch):
            idx = order[start:start + batch]
            bg_logits, obj_logits = net(images[idx])
            loss = (F.cross_entropy(bg_logits, bg[idx])
                    + F.cross_entropy(obj_logits.flatten(0, 1), obj[idx].flatten()))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        log(f"classifier epoch {epoch}: loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    return net.eval()


def load_or_train(path: str, seed: int = 0, log=print) -> ShapeNet:
    if os.path.isfile(path):
        net = ShapeNet()
        net.load_state_dict(torch.load(path))
        return net.eval()
    net = train(seed, log=log)
    torch.save(net.state_dict(), path)
    return net


@torch.no_grad()
def embed(net: ShapeNet, images: np.ndarray, chunk: int = 64) -> np.ndarray:
    """uint8 [N, H, W, 3] -> float64 [N, FEATURES]."""
    return np.concatenate([net.features(to_input(images[i:i + chunk])).double().numpy()
                           for i in range(0, len(images), chunk)])


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """FD between Gaussians fitted to two feature sets [N, D]. tr((S_a S_b)^(1/2)) is the sum of the
    square roots of the eigenvalues of S_a^(1/2) S_b S_a^(1/2) (symmetric PSD, so eigh is exact)."""
    mu_a, mu_b = feats_a.mean(0), feats_b.mean(0)
    cov_a, cov_b = (np.atleast_2d(np.cov(f, rowvar=False)) for f in (feats_a, feats_b))
    w, v = np.linalg.eigh(cov_a)
    sqrt_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b)
                 - 2 * np.sqrt(np.clip(cross, 0, None)).sum())

"""bench/quality's FID analogue: the Fréchet distance and the classifier's feature shapes."""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.quality import features


def hadamard(n: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def diagonal_set(mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Features whose sample mean is ``mean`` and sample covariance is exactly diagonal: the columns
    are Hadamard rows (orthogonal, zero mean, entries ±1) times ``scale``."""
    n = 64
    design = hadamard(n)[1:1 + len(mean)].T  # [n, d], the constant row left out
    return mean + design * scale


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(-3, 3), st.floats(-3, 3), st.floats(0.1, 4), st.floats(0.1, 4)),
                min_size=1, max_size=8))
def test_fd_of_commuting_covariances_is_the_closed_form(dims):
    mu_a, mu_b, s_a, s_b = (np.array(v) for v in zip(*dims, strict=True))
    var = 64 / 63  # np.cov divides the sum of the ±1 squares (64) by n - 1
    expected = ((mu_a - mu_b) ** 2).sum() + ((s_a - s_b) ** 2 * var).sum()
    got = features.frechet_distance(diagonal_set(mu_a, s_a), diagonal_set(mu_b, s_b))
    assert abs(got - expected) < 1e-6 * (1 + expected)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 10 ** 6))
def test_fd_is_zero_on_itself_symmetric_and_rotation_invariant(seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(size=(150, 6)) @ rng.normal(size=(6, 6)) + rng.normal(size=6)
    rotation = np.linalg.qr(rng.normal(size=(6, 6)))[0]
    fd = features.frechet_distance(a, b)
    assert abs(features.frechet_distance(a, a)) < 1e-6 * np.trace(np.cov(a, rowvar=False))
    assert fd > 0
    assert abs(features.frechet_distance(b, a) - fd) < 1e-6 * fd
    assert abs(features.frechet_distance(a @ rotation, b @ rotation) - fd) < 1e-6 * fd


def test_classifier_gives_one_feature_vector_per_image():
    net = features.ShapeNet().eval()
    images = np.zeros((3, 256, 256, 3), np.uint8)
    out = features.embed(net, images)
    assert out.shape == (3, features.FEATURES) and out.dtype == np.float64
    with torch.no_grad():
        bg, obj = net(features.to_input(images))
    assert bg.shape == (3, len(features.BACKGROUNDS))
    assert obj.shape == (3, len(features.COLOURS), len(features.data.SHAPES) + 1)

"""bench/quality's set (not trained) VAE: mean pooling in, nearest upsampling out, in ldm's layout.

Needs the training requirements (requirements-train.txt: diffusers, opencv); skipped without them.
"""

import pytest
import torch
import torch.nn.functional as F

diffusers = pytest.importorskip("diffusers", reason="training tooling: pip install -r requirements-train.txt")
pytest.importorskip("cv2", reason="training tooling: pip install -r requirements-train.txt")

from bench.quality import analytic_vae, check, data  # noqa: E402
from bench.quality.train import VAE, build  # noqa: E402


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    model = build(str(tmp_path_factory.mktemp("tok")))[0]
    analytic_vae.set_weights(model)
    return model.eval()


@torch.no_grad()
def test_latents_are_patch_means_and_decode_to_their_blocks(vae):
    assert VAE.ch == analytic_vae.CH
    scores = []
    for i in range(6):
        s = data.sample(0, i, "heldout")
        x = torch.from_numpy(s.image).permute(2, 0, 1)[None].float() / 127.5 - 1
        posterior = vae.encode(x).latent_dist
        pooled = F.avg_pool2d(x, 8)
        assert (posterior.mean[:, :3] - pooled).abs().max() < 1e-2
        assert (analytic_vae.encode_mean(vae, x) - posterior.mean).abs().max() < 1e-2
        assert posterior.mean[:, 3].abs().max() < 1e-3 and posterior.std.max() < 1e-5
        rec = vae.decode(posterior.mean).sample
        assert (rec - F.interpolate(pooled, scale_factor=8, mode="nearest")).abs().max() < 2e-2
        image = ((rec[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        kinds = [(o.colour, o.shape) for o in s.objects]
        scores.append(check.score(check.detect(image), s.background, kinds))
    assert check.summarise(scores)["colour_recall"] == 1.0


@torch.no_grad()
def test_the_group_norms_keep_a_colour_s_level(vae):
    """Flat images of different colours decode to those colours (a per-group norm would map
    every flat image to the same output)."""
    for level in (-0.8, -0.1, 0.5, 0.9):
        x = torch.full((1, 3, 64, 64), level)
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample
        assert (rec - level).abs().max() < 1e-2

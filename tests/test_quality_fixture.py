"""The committed weights of bench/quality's learned model (bench/quality/fixture/): what they hold.

The checkpoint the WebUI loads is written from them by ``python -m bench.quality.convert
--from-fixture`` (which needs the training requirements: the set VAE is rebuilt with diffusers).
"""

import os

import pytest
import torch
from safetensors import safe_open

from bench.quality import convert
from bench.quality.train import TE, UNET, VAE
from tests.e2e import models as e2e

MAX_MB = 20


@pytest.fixture(scope="module")
def fixture_tensors():
    with safe_open(convert.FIXTURE, "pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}


def test_fixture_is_small_enough_to_commit():
    assert os.path.getsize(convert.FIXTURE) <= MAX_MB * 1e6


def test_fixture_holds_exactly_the_learnt_ldm_tensors(fixture_tensors):
    spec = {**e2e.unet_spec(UNET), **e2e.clip_text_spec(TE), **e2e.vae_spec(VAE)}
    learnt = {k: tuple(v) for k, v in spec.items() if k.startswith(convert.LEARNT)}
    got = {k: tuple(v.shape) for k, v in fixture_tensors.items()
           if not k.endswith("position_ids")}
    assert got == learnt
    for k, v in fixture_tensors.items():
        if v.is_floating_point():
            assert v.dtype == (torch.float32 if k.startswith("first_stage_model.") else torch.float16), k
            assert torch.isfinite(v).all(), k


def test_checkpoint_from_fixture_is_complete():
    pytest.importorskip("diffusers", reason="training tooling: pip install -r requirements-train.txt")
    sd = convert.from_fixture(convert.FIXTURE)
    convert.check_specs(sd)

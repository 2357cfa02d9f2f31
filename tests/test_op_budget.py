"""Issue 11's budget on a GPU's code paths: ops per observed block and host syncs per step."""

import pytest
import torch

from scfg_ext import bench
from scfg_ext.bench import FUSED_KERNEL, SYNC_OPS, OpCounter, count_ops


@pytest.mark.parametrize("config", ["sd15-512", "sdxl-1024"])
@pytest.mark.parametrize("batch", [1, 4])
def test_the_fused_path_stays_within_25_ops_per_block_and_never_syncs(config, batch):
    r = count_ops(config, batch, path="fused")
    assert r["ops_per_block"] <= 25, r
    assert r["syncs_per_step"] == 0 and r["host_data_per_step"] == 0, r


@pytest.mark.parametrize("config", ["sd15-512", "sdxl-1024"])
def test_the_materialised_path_never_syncs(config):
    r = count_ops(config, 4, path="materialised")
    assert r["syncs_per_step"] == 0 and r["host_data_per_step"] == 0, r


def test_the_counter_sees_syncs_and_the_fused_kernel_is_one_op():
    """The counter is not blind: a read-back is a sync, and the fused path's SDPA counts once per call."""
    with OpCounter() as counter:
        float(torch.ones(3).sum())
    assert any(op in SYNC_OPS for op in counter.ops)
    sdpa = bench._as_one_kernel(torch.nn.functional.scaled_dot_product_attention)
    q, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 24)
    with OpCounter() as counter:
        sdpa(q, q, v)
    assert counter.ops == [FUSED_KERNEL]

"""Where S fits the device's budget it is built once per block, not recomputed for every power."""

import torch

from scfg_ext import attention, make_params
from scfg_ext.attention import CPU_BUDGET_BYTES, DEFAULT_BUDGET_BYTES, device_budget
from scfg_ext.segment import Geometry
from scfg_ext.step import StepCapture


def test_budgets_per_device():
    assert device_budget("cpu") == CPU_BUDGET_BYTES > DEFAULT_BUDGET_BYTES
    assert device_budget("meta") == DEFAULT_BUDGET_BYTES
    geometry = Geometry()
    assert geometry.budget("cpu") == CPU_BUDGET_BYTES


def test_a_64x64_level_holds_s_once_on_the_cpu(monkeypatch):
    """N = 4096 (SDXL 2048², latent/4): 128 MiB for two rows, above the old 64 MiB budget."""
    calls = []
    real = attention._head_mean_chunks
    monkeypatch.setattr(attention, "_head_mean_chunks", lambda *a: calls.append(a[0].shape) or real(*a))
    n, heads = 4096, 1
    q = torch.randn(2, n, heads * 8) * 0.1
    capture = StepCapture(make_params(enabled=True), (64, 64), 1)
    capture.self_attention("b", (0, 1), q, q, heads, None)
    capture.cross_attention("b", (0, 1), torch.randn(2, n, 8), torch.randn(2, 77, 8), heads, None, (64, 64))
    assert capture.budget == CPU_BUDGET_BYTES
    assert len(calls) == 2  # the cross map once, S once (streaming would compute S for each power)

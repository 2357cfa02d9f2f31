"""Both adapters decide alike for the same generation: the same levels, pairs, scales, START
positions, preview rows and step window (through each adapter's own fake host)."""

import pytest

from scfg_ext import StepCapture, make_params
from scfg_ext.hosts import common
from scfg_ext.report import RunReport
from tests import test_a1111_adapter as A
from tests import test_forge_adapter as F

host = A.host
fake_forge = F.fake_forge


def record(monkeypatch, target):
    """Every StepCapture.result call: (scales per pair, START counts per row) and the rate."""
    calls, result = [], StepCapture.result

    def spy(self, pairs, cond, uncond):
        out = result(self, pairs, cond, uncond)
        starts = [self._gather([p.cond_row]).start_mask.sum().item() for p in pairs]
        calls.append(([round(p.scale, 6) for p in pairs], starts, out.rate))
        return out

    monkeypatch.setattr(target, "result", spy)
    return calls


@pytest.mark.parametrize("weights", [(1.0,), (1.0, 0.6)])
def test_pairs_scales_starts_and_previews_agree(host, fake_forge, monkeypatch, weights):
    """Batch 2, AND sub-prompts with weights, a two-chunk cond against a one-chunk uncond."""
    calls_a = record(monkeypatch, StepCapture)
    cond, uncond = A.contexts(2 * len(weights), 2, length=154, uncond_length=77)
    report_a = RunReport(preview_steps=4)
    _, report_a = A.run_steps(host, make_params(enabled=True), batch=(weights, weights), layout="separate",
                              cond_ctx=cond, uncond_ctx=uncond, steps=1, report=report_a,
                              p=A.SimpleNamespace(prompt="", iteration=0, batch_size=2))
    p = F.make_p(batch=2)
    report_f = RunReport(preview_steps=4)
    fake_forge.setup(p, make_params(enabled=True), report_f)
    F.step(p, F.latent(2), F.conds(2, tuple(range(1, len(weights) + 1)), tokens=2 * F.TOKENS,
                                  strengths=weights if len(weights) > 1 else None), F.conds(2, (9,)))
    calls_f = calls_a[1:]
    del calls_a[1:]
    assert report_a.applied == report_f.applied == 1 and not report_a.fallbacks and not report_f.fallbacks
    # A1111: one result call over all (image, sub-prompt) pairs; Forge: one per sub-prompt
    scales_a = dict(zip([(i, j) for i in range(2) for j in range(len(weights))], calls_a[0][0], strict=True))
    scales_f = {(i, j): s for j, (scales, _, _) in enumerate(calls_f) for i, s in enumerate(scales)}
    assert scales_a == pytest.approx({k: 7.0 * weights[k[1]] for k in scales_a})
    assert scales_f == pytest.approx(scales_a)  # Forge: γ·e·w̄ⱼ with e = Σ w, w̄ⱼ = wⱼ / e
    assert calls_a[0][1] == [2] * len(calls_a[0][1])  # two chunks: two START positions per row
    assert all(starts == [2, 2] for _, starts, _ in calls_f)
    assert set(report_a.previews) == set(report_f.previews) == {(i, j) for i in range(2)
                                                                 for j in range(len(weights))}
    assert A.a1111._run.factors == fake_forge._current[3].factors == (4, 8)
    assert all(0.8 <= float(r.min()) and float(r.max()) <= 3.0 for _, _, r in calls_a + calls_f)


def test_step_window_and_cfg_one_agree(host, fake_forge):
    params = make_params(enabled=True, start=0.25, end=0.75)
    _, report_a = A.run_steps(host, params, steps=5)
    p = F.make_p(steps=5)
    report_f = RunReport()
    fake_forge.setup(p, params, report_f)
    for i in range(5):
        p.sampler.model_wrap_cfg.step = i
        F.step(p, F.latent(1), F.conds(1, (1,)), F.conds(1, (2,)))
    assert report_a.applied == report_f.applied == 3
    assert report_a.fallbacks == report_f.fallbacks == {"step outside S-CFG's start/end": 2}
    fake_forge.teardown()
    _, report_a = A.run_steps(host, make_params(enabled=True), steps=2, cond_scale=1.0)
    report_f = RunReport()
    fake_forge.setup(F.make_p(), make_params(enabled=True), report_f)
    F.step(fake_forge._current[3].p, F.latent(1), F.conds(1, (1,)), F.conds(1, (2,)), scale=1.0)
    assert report_a.applied == report_f.applied == 0
    assert set(report_a.fallbacks) == set(report_f.fallbacks) == {common.NO_GUIDANCE}

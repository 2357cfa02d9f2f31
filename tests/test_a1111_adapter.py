"""The A1111 adapter against small fakes: an ldm-shaped UNet and a denoiser with A1111's row layouts.

The fake ``denoise`` follows ``CFGDenoiser.forward`` (modules/sd_samplers_cfg_denoiser.py, v1.10.1):
x_in = cond rows (image-major) + one uncond row per image, on_cfg_denoiser, the UNet calls of each
layout, the fake uncond of skipped steps, on_cfg_denoised (in place only), combine_denoised.
"""

import math
import sys
import types
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scfg_ext import make_params
from scfg_ext.hosts import a1111, common
from scfg_ext.report import RunReport

CTX = 6  # context width of the fake text encoder


# ----------------------------------------------------------------------------- fake UNet
# Class names matter: the adapter walks the UNet by them, as it does ldm's and sgm's.

class CrossAttention(nn.Module):
    def __init__(self, dim, context_dim=None, heads=2):
        super().__init__()
        ctx = context_dim or dim
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(ctx, dim, bias=False)
        self.to_v = nn.Linear(ctx, dim, bias=False)

    def forward(self, x, context=None):
        ctx = x if context is None else context
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2)
                   for t in (self.to_q(x), self.to_k(ctx), self.to_v(ctx)))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.attn1, self.attn2 = CrossAttention(dim), CrossAttention(dim, CTX)

    def forward(self, x, context=None):
        x = self.attn1(x) + x
        return self.attn2(x, context=context) + x


class SpatialTransformer(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(dim)])

    def forward(self, x, context=None):
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        for block in self.transformer_blocks:
            t = block(t, context=context)
        return t.transpose(1, 2).reshape(b, c, h, w)


class Downsample(nn.Module):
    def forward(self, x):  # rounds up, like ldm's stride-2 conv with padding 1
        return F.avg_pool2d(x, 2, ceil_mode=True)


class Upsample(nn.Module):
    def forward(self, x):
        return F.interpolate(x, scale_factor=2.0, mode="nearest")


class Seq(nn.Sequential):  # ldm's TimestepEmbedSequential
    def forward(self, x, context=None):
        for layer in self:
            x = layer(x, context=context) if isinstance(layer, SpatialTransformer) else layer(x)
        return x


class UNetModel(nn.Module):
    """SD1.5 topology in miniature: attention at latent/1, /2, /4 and the middle block at /8."""

    def __init__(self, dim=8, seed=0, levels=(1, 2, 4, 8)):
        super().__init__()
        torch.manual_seed(seed)

        def st(factor):
            return SpatialTransformer(dim) if factor in levels else nn.Identity()

        self.input_blocks = nn.ModuleList([
            Seq(nn.Conv2d(4, dim, 1)), Seq(st(1)), Seq(Downsample()), Seq(st(2)), Seq(Downsample()),
            Seq(st(4)), Seq(Downsample())])
        self.middle_block = Seq(st(8))
        self.output_blocks = nn.ModuleList([
            Seq(nn.Identity(), Upsample()), Seq(st(4), Upsample()), Seq(st(2), Upsample()), Seq(st(1)),
            Seq(nn.Conv2d(dim, 4, 1))])

    def forward(self, x, timesteps=None, context=None):
        (height, width), factor, h, skips = x.shape[-2:], 1, x, {}
        for block in self.input_blocks:
            h = block(h, context)
            factor *= 2 if isinstance(block[-1], Downsample) else 1
            skips[factor] = h
        h = self.middle_block(h, context)
        for block in self.output_blocks:
            if isinstance(block[-1], nn.Conv2d):
                return block(h)
            h = block(h, context)
            if isinstance(block[-1], Upsample):  # decoder sizes match the encoder's (A1111's cat hijack)
                factor //= 2
                h = h[..., :math.ceil(height / factor), :math.ceil(width / factor)] + skips[factor]
        return h


# ----------------------------------------------------------------------------- fake WebUI

@pytest.fixture
def host(monkeypatch):
    """Fake ``modules`` package: shared, script_callbacks, sd_unet, hypernetworks."""
    unet = UNetModel()
    opts = SimpleNamespace(skip_early_cond=0.0, s_min_uncond_all=False, batch_cond_uncond=True)
    model = SimpleNamespace(model=SimpleNamespace(diffusion_model=unet), is_sdxl=False, is_sd3=False,
                            cond_stage_key="txt")
    callback_map = {"callbacks_cfg_denoiser": [], "callbacks_cfg_denoised": []}

    def registrar(category):
        return lambda fn, *, name=None: callback_map[f"callbacks_{category}"].append(
            SimpleNamespace(callback=fn, name=name))

    mods = {
        "modules": dict(),
        "modules.shared": dict(sd_model=model, loaded_hypernetworks=[], opts=opts),
        "modules.script_callbacks": dict(callback_map=callback_map, on_cfg_denoiser=registrar("cfg_denoiser"),
                                         on_cfg_denoised=registrar("cfg_denoised")),
        "modules.sd_unet": dict(current_unet=None),
        "modules.hypernetworks": dict(),
        "modules.hypernetworks.hypernetwork": dict(
            apply_hypernetworks=lambda nets, ctx, layer=None: (ctx * 2, ctx)),
    }
    for name, attrs in mods.items():
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, module)
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, module)
    a1111.teardown()
    yield SimpleNamespace(unet=unet, opts=opts, model=model, callbacks=callback_map,
                          shared=sys.modules["modules.shared"], sd_unet=sys.modules["modules.sd_unet"])
    a1111.teardown()


def make_denoiser(p, batch, cond_scale=7.0, steps=4, s_min_uncond=0.0, multiplier=1.0, order=1):
    """A CFGDenoiser's fields the adapter reads; ``batch`` is [[weight, ...] per image]."""
    cond = SimpleNamespace(batch=[[SimpleNamespace(weight=w) for w in ws] for ws in batch])
    extra = {"cond": cond, "uncond": None, "cond_scale": cond_scale, "s_min_uncond": s_min_uncond}
    return SimpleNamespace(p=p, step=0, steps=steps, total_steps=steps * order,
                           cond_scale_miltiplier=multiplier,
                           sampler=SimpleNamespace(sampler_extra_args=extra))


def denoise(host, denoiser, x, cond_ctx, uncond_ctx, layout="batched", sigma=1.0):
    """One CFGDenoiser.forward: x [B,4,H,W]; cond_ctx [n_cond, L, CTX]; uncond_ctx [B, Lu, CTX]."""
    batch = [[c.weight for c in image] for image in denoiser.sampler.sampler_extra_args["cond"].batch]
    conds_list, row = [], 0
    for weights in batch:
        conds_list.append([(row + j, w) for j, w in enumerate(weights)])
        row += len(weights)
    b, n_cond = x.shape[0], row
    x_in = torch.cat([x[i:i + 1].repeat(len(ws), 1, 1, 1) for i, ws in enumerate(batch)] + [x])
    sigma_in = torch.full((x_in.shape[0],), float(sigma))
    params = SimpleNamespace(x=x_in, image_cond=None, sigma=sigma_in, sampling_step=denoiser.step,
                             total_sampling_steps=denoiser.total_steps, text_cond=cond_ctx,
                             text_uncond=uncond_ctx, denoiser=denoiser)
    for c in host.callbacks["callbacks_cfg_denoiser"]:
        c.callback(params)
    s_min = denoiser.sampler.sampler_extra_args["s_min_uncond"]
    skip = (host.opts.skip_early_cond and denoiser.step / denoiser.total_steps <= host.opts.skip_early_cond) \
        or (denoiser.step % 2 and s_min > 0 and sigma < s_min)
    unet = host.model.model.diffusion_model
    x_out = torch.zeros_like(x_in)
    if skip:
        x_out = unet(x_in[:n_cond], context=cond_ctx)
        x_out = torch.cat([x_out, torch.cat([x_out[c[0][0]:c[0][0] + 1] for c in conds_list])])
    elif layout == "batched":
        x_out = unet(x_in, context=torch.cat([cond_ctx, uncond_ctx]))
    elif layout == "unbatched":
        ctx = torch.cat([cond_ctx, uncond_ctx])
        for a in range(0, x_in.shape[0], b):
            x_out[a:a + b] = unet(x_in[a:a + b], context=ctx[a:a + b])
    else:  # separate cond/uncond passes (unequal lengths): cond chunks of 2B, then the uncond rows
        for a in range(0, n_cond, 2 * b):
            e = min(a + 2 * b, n_cond)
            x_out[a:e] = unet(x_in[a:e], context=cond_ctx[a:e])
        x_out[-b:] = unet(x_in[-b:], context=uncond_ctx)
    for c in host.callbacks["callbacks_cfg_denoised"]:
        c.callback(SimpleNamespace(x=x_out, sampling_step=denoiser.step,
                                   total_sampling_steps=denoiser.total_steps, inner_model=unet))
    scale = 1.0 if skip else \
        denoiser.sampler.sampler_extra_args["cond_scale"] * denoiser.cond_scale_miltiplier
    out = x_out[-b:].clone()
    for i, conds in enumerate(conds_list):
        for row, weight in conds:
            out[i] += (x_out[row] - x_out[n_cond + i]) * (weight * scale)
    denoiser.step += 1
    return out


def contexts(n_cond, b, length=10, uncond_length=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(n_cond, length, CTX, generator=g) * 3
    uncond = torch.randn(b, uncond_length or length, CTX, generator=g) * 3
    return cond, uncond


def latent(b=1, h=8, w=8, seed=2):
    return torch.randn(b, 4, h, w, generator=torch.Generator().manual_seed(seed))


def run_steps(host, params, batch=((1.0,),), layout="batched", steps=4, hw=(8, 8), report=None,
              cond_ctx=None, uncond_ctx=None, p=None, **denoiser_kw):
    """``steps`` denoiser calls with S-CFG set up (params) or off (None); returns outputs and report."""
    p = p or SimpleNamespace(prompt="a cat")
    report = report or RunReport(host="a1111")
    n_cond = sum(len(ws) for ws in batch)
    if cond_ctx is None:
        cond_ctx, uncond_ctx = contexts(n_cond, len(batch))
    if params is not None:
        assert a1111.setup(p, params, report)
    denoiser = make_denoiser(p, [list(ws) for ws in batch], steps=steps, **denoiser_kw)
    x = latent(len(batch), *hw)
    with torch.no_grad():
        outs = [denoise(host, denoiser, x, cond_ctx, uncond_ctx, layout)
                for _ in range(denoiser.total_steps)]
    return torch.stack(outs), report


# ----------------------------------------------------------------------------- tests

def test_discover_walks_levels_like_ldm(host):
    found = [(s.factor, s.key, s.name) for s in common.transformer_sites(host.unet)]
    assert found == [(1, ("input", 1, 0), "input_blocks.1.0.transformer_blocks.0"),
                     (2, ("input", 3, 0), "input_blocks.3.0.transformer_blocks.0"),
                     (4, ("input", 5, 0), "input_blocks.5.0.transformer_blocks.0"),
                     (8, ("middle", 0, 0), "middle_block.0.transformer_blocks.0"),
                     (4, ("output", 1, 0), "output_blocks.1.0.transformer_blocks.0"),
                     (2, ("output", 2, 0), "output_blocks.2.0.transformer_blocks.0"),
                     (1, ("output", 3, 0), "output_blocks.3.0.transformer_blocks.0")]


def test_setup_hooks_the_two_smallest_levels_and_teardown_removes_all(host):
    a1111.setup(SimpleNamespace(prompt=""), make_params(enabled=True), RunReport())
    names = a1111.installed()
    assert "diffusion_model" in names
    assert {n.split(".transformer_blocks")[0] for n in names if "attn" in n} == \
        {"input_blocks.5.0", "middle_block.0", "output_blocks.1.0"}
    assert len(host.callbacks["callbacks_cfg_denoiser"]) == 1  # registered once
    a1111.teardown()
    assert a1111.installed() == []
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in host.unet.modules())


def test_sdxl_takes_latent_4_only_and_the_refiner_two_levels(host):
    host.model.is_sdxl = True
    host.model.model.diffusion_model = UNetModel(levels=(2, 4))  # SDXL base: attention at /2 and /4
    a1111.setup(SimpleNamespace(prompt=""), make_params(enabled=True), RunReport())
    assert {n.split(".transformer_blocks")[0] for n in a1111.installed() if "attn" in n} == \
        {"input_blocks.5.0", "output_blocks.1.0"}
    host.model.model.diffusion_model = UNetModel(levels=(2, 4, 8))  # refiner: also the middle at /8
    a1111.setup(SimpleNamespace(prompt=""), make_params(enabled=True), RunReport())
    assert {n.split(".transformer_blocks")[0] for n in a1111.installed() if "attn" in n} == \
        {"input_blocks.5.0", "middle_block.0", "output_blocks.1.0"}


def test_explicit_levels_and_a_missing_level(host):
    report = RunReport()
    assert a1111.setup(SimpleNamespace(prompt=""), make_params(enabled=True, levels="2"), report)
    assert {n.split(".transformer_blocks")[0] for n in a1111.installed() if "attn" in n} == \
        {"input_blocks.3.0", "output_blocks.2.0"}
    assert not a1111.setup(SimpleNamespace(prompt=""), make_params(enabled=True, levels="16"), report)
    assert a1111.installed() == [] and report.notes


def test_scfg_changes_the_result_and_reports_steps(host):
    plain, _ = run_steps(host, None)
    scfg, report = run_steps(host, make_params(enabled=True))
    assert not torch.allclose(plain, scfg)
    assert report.applied == 4 and not report.fallbacks
    assert 0.8 <= report.rate_min <= report.rate_max <= 3.0


def test_rates_forced_to_one_is_plain_cfg(host):
    plain, _ = run_steps(host, None)
    same, report = run_steps(host, make_params(enabled=True, min_rate=1.0, max_rate=1.0))
    assert report.applied == 4
    torch.testing.assert_close(same, plain, rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["unbatched", "separate"])
def test_every_row_layout_gives_the_batched_result(host, layout):
    """Batch 2 with an AND prompt on image 0: the UNet calls may split the rows in any way."""
    batch = ((1.0, 0.6), (1.0,))
    batched, _ = run_steps(host, make_params(enabled=True), batch=batch, layout="batched")
    other, report = run_steps(host, make_params(enabled=True), batch=batch, layout=layout)
    assert report.applied == 4 and not report.fallbacks
    torch.testing.assert_close(other, batched, rtol=1e-4, atol=1e-5)  # fp32 sums in another order


def test_unequal_prompt_lengths_and_long_prompts(host):
    """154-token cond (two 77-token chunks) against a 77-token uncond: separate passes."""
    cond, uncond = contexts(2, 2, length=154, uncond_length=77)
    out, report = run_steps(host, make_params(enabled=True), batch=((1.0,), (1.0,)), layout="separate",
                            cond_ctx=cond, uncond_ctx=uncond)
    plain, _ = run_steps(host, None, batch=((1.0,), (1.0,)), layout="separate", cond_ctx=cond,
                         uncond_ctx=uncond)
    assert report.applied == 4 and not report.fallbacks
    assert not torch.allclose(out, plain)


def test_images_of_a_batch_are_independent(host):
    cond, uncond = contexts(2, 2)
    both, _ = run_steps(host, make_params(enabled=True), batch=((1.0,), (1.0,)), cond_ctx=cond,
                        uncond_ctx=uncond)
    x = latent(2)
    for i in range(2):
        p, report = SimpleNamespace(prompt=""), RunReport()
        a1111.setup(p, make_params(enabled=True), report)
        denoiser = make_denoiser(p, [[1.0]])
        alone = torch.stack([denoise(host, denoiser, x[i:i + 1], cond[i:i + 1], uncond[i:i + 1])
                             for _ in range(4)])
        torch.testing.assert_close(alone[:, 0], both[:, i], rtol=1e-5, atol=1e-5)


def test_non_square_and_odd_latents(host):
    for hw in ((8, 12), (9, 13)):
        plain, _ = run_steps(host, None, hw=hw)
        out, report = run_steps(host, make_params(enabled=True), hw=hw)
        assert out.shape == plain.shape and report.applied == 4 and not report.fallbacks


def test_skipped_uncond_is_plain_cfg_without_work(host, monkeypatch):
    calls, self_attention = [], a1111.StepCapture.self_attention
    monkeypatch.setattr(a1111.StepCapture, "self_attention",
                        lambda *a: calls.append(a) or self_attention(*a))
    plain, _ = run_steps(host, None, s_min_uncond=5.0)
    out, report = run_steps(host, make_params(enabled=True, min_rate=1.0, max_rate=1.0), s_min_uncond=5.0)
    assert report.fallbacks[a1111.NO_UNCOND] == 2 and len(calls) == 3 * 2  # odd steps only
    torch.testing.assert_close(out, plain, rtol=0, atol=1e-5)
    host.opts.skip_early_cond = 0.5
    _, report = run_steps(host, make_params(enabled=True))
    assert report.fallbacks[a1111.NO_UNCOND] == 3 and report.applied == 1  # steps 0, 1, 2 of 4


def test_step_window(host):
    _, report = run_steps(host, make_params(enabled=True, start=0.5), steps=6)
    assert report.applied == 3  # 3/6, 4/6, 5/6


def test_other_p_and_stale_runs_are_left_alone(host):
    plain, _ = run_steps(host, None)
    a1111.setup(SimpleNamespace(prompt=""), make_params(enabled=True), RunReport())
    other, _ = run_steps(host, None, p=SimpleNamespace(prompt=""))  # ADetailer-like foreign p
    torch.testing.assert_close(other, plain, rtol=0, atol=0)


def test_interrupted_step_leaves_nothing_behind(host):
    p, report = SimpleNamespace(prompt=""), RunReport()
    a1111.setup(p, make_params(enabled=True), report)
    denoiser = make_denoiser(p, [[1.0]])
    params = SimpleNamespace(x=latent().repeat(2, 1, 1, 1), sigma=torch.ones(2), denoiser=denoiser)
    a1111.on_cfg_denoiser(params)  # ... and the sampler is interrupted before on_cfg_denoised
    a1111.setup(SimpleNamespace(prompt=""), make_params(enabled=True), RunReport())  # next generation
    a1111.teardown()
    assert a1111.installed() == [] and report.applied == 0
    plain, _ = run_steps(host, None)
    again, _ = run_steps(host, None)
    torch.testing.assert_close(again, plain, rtol=0, atol=0)


def _boom(*args, **kwargs):
    raise RuntimeError("boom")


FAULTS = {  # a place in the adapter -> what to break there
    "on_cfg_denoiser": (a1111, "_new_call"),
    "unet hook": (a1111, "_on_unet"),
    "transformer hook": (a1111, "_on_transformer"),
    "attn1 hook": (a1111.StepCapture, "self_attention"),
    "attn2 hook": (a1111, "_hyper"),
    "on_cfg_denoised": (a1111, "prescale_cond"),
}


@pytest.mark.parametrize("place", [*FAULTS, "core cross_attention", "core result", "core oom"])
def test_a_fault_anywhere_falls_back_to_plain_cfg_with_one_warning(host, monkeypatch, caplog, place):
    plain, _ = run_steps(host, None)
    if place.startswith("core"):  # the core's named-only test hook, as the e2e suite uses it
        params = make_params(enabled=True, test_fault=place.split()[1])
    else:
        params = make_params(enabled=True)
        monkeypatch.setattr(*FAULTS[place], _boom)  # before setup, which binds the hook bodies
    out, report = run_steps(host, params)
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
    assert report.applied == 0 and sum(report.fallbacks.values()) == 4, report.fallbacks
    assert len([r for r in caplog.records if "S-CFG" in r.getMessage()]) == 1


def _no_hooks_left(host):
    return a1111.installed() == [] and all(not m._forward_hooks and not m._forward_pre_hooks
                                           for m in host.unet.modules())


def test_a_setup_that_raises_part_way_leaves_nothing_installed(host):
    with pytest.raises(RuntimeError, match="injected test fault in setup"):
        a1111.setup(SimpleNamespace(prompt=""), make_params(enabled=True, test_fault="setup"), RunReport())
    assert _no_hooks_left(host)


def test_a_teardown_that_raises_still_removes_every_hook(host, monkeypatch):
    a1111.setup(SimpleNamespace(prompt=""), make_params(enabled=True, test_fault="teardown"), RunReport())
    with pytest.raises(RuntimeError, match="injected test fault in teardown"):
        a1111.teardown()
    assert _no_hooks_left(host)
    a1111.setup(SimpleNamespace(prompt=""), make_params(enabled=True), RunReport())
    first = a1111._run.handles[0]
    monkeypatch.setattr(first, "remove", _boom)  # one handle that refuses: the others still go
    with pytest.raises(RuntimeError, match="boom"):
        a1111.teardown()
    monkeypatch.undo()
    first.remove()
    assert _no_hooks_left(host)


def test_tiled_unet_call_falls_back(host):
    """Tiled Diffusion calls the UNet on tiles: the rows cannot be named, so plain CFG."""
    p, report = SimpleNamespace(prompt=""), RunReport()
    a1111.setup(p, make_params(enabled=True), report)
    x, (cond, uncond) = latent(), contexts(1, 1)
    a1111.on_cfg_denoiser(SimpleNamespace(x=torch.cat([x, x]), sigma=torch.ones(2),
                                          denoiser=make_denoiser(p, [[1.0]])))
    host.unet(torch.cat([x, x])[..., :4, :4], context=torch.cat([cond, uncond]))
    x_out = torch.randn(2, 4, 8, 8)
    before = x_out.clone()
    a1111.on_cfg_denoised(SimpleNamespace(x=x_out))
    assert torch.equal(x_out, before)
    assert report.fallbacks["attention layout not understood"] == 1 and report.warned


def test_merged_tokens_fall_back(host, monkeypatch):
    """ToMe-like token merging before attn1: N != h*w, so plain CFG with one warning."""
    block = host.unet.input_blocks[5][0].transformer_blocks[0]

    def merged(x, context=None):
        x = x + F.pad(block.attn1(x[:, :-1]), (0, 0, 0, 1))
        return block.attn2(x, context=context) + x

    monkeypatch.setattr(block, "forward", merged)
    _, report = run_steps(host, make_params(enabled=True))
    assert report.applied == 0 and report.fallbacks["attention layout not understood"] == 4


def test_refiner_switch_rehooks_the_new_unet(host):
    p, report = SimpleNamespace(prompt=""), RunReport()
    a1111.setup(p, make_params(enabled=True), report)
    old, new = host.unet, UNetModel(seed=3)
    denoiser = make_denoiser(p, [[1.0]], steps=2)
    cond, uncond = contexts(1, 1)
    denoise(host, denoiser, latent(), cond, uncond)
    host.model.model.diffusion_model = new  # apply_refiner loaded another model object
    denoise(host, denoiser, latent(), cond, uncond)
    assert report.applied == 2 and not report.fallbacks
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in old.modules())
    assert any(m._forward_hooks for m in new.modules())


def test_pair_scales_use_the_weight_and_the_cfgpp_multiplier(host, monkeypatch):
    seen = []
    result = a1111.StepCapture.result
    monkeypatch.setattr(a1111.StepCapture, "result",
                        lambda self, pairs, c, u: seen.append(pairs) or result(self, pairs, c, u))
    run_steps(host, make_params(enabled=True), batch=((1.0, -0.5), (2.0,)), steps=1, multiplier=0.08)
    assert [(p.cond_row, p.uncond_row) for p in seen[0]] == [(0, 3), (1, 3), (2, 4)]
    assert [p.scale for p in seen[0]] == pytest.approx([0.56, 0.28, 1.12])


def test_hypernetworks_feed_to_k_as_in_a1111(host, monkeypatch):
    keys = []
    cross = a1111.StepCapture.cross_attention
    monkeypatch.setattr(a1111.StepCapture, "cross_attention",
                        lambda self, b, rows, q, k, *a: keys.append(k) or cross(self, b, rows, q, k, *a))
    run_steps(host, make_params(enabled=True), steps=1)
    host.shared.loaded_hypernetworks = ["net"]  # the fake network doubles the context
    run_steps(host, make_params(enabled=True), steps=1)
    torch.testing.assert_close(keys[3], keys[0] * 2)


def test_projections_of_the_attention_itself_are_reused(host, monkeypatch):
    """to_q/to_k run once per attention call with S-CFG on; recomputing them gives the same result."""
    calls = []
    for module in host.unet.modules():
        if isinstance(module, nn.Linear):
            module.register_forward_hook(lambda m, a, o: calls.append(m))
    run_steps(host, None, steps=1)
    plain_calls = len(calls)
    calls.clear()
    reused, _ = run_steps(host, make_params(enabled=True), steps=1)
    assert len(calls) == plain_calls
    a1111.teardown()
    monkeypatch.setattr(a1111, "_project", lambda target, key, linear, x: linear(x))
    recomputed, _ = run_steps(host, make_params(enabled=True), steps=1)
    assert torch.equal(reused, recomputed)


def test_unsupported_models(host):
    p = SimpleNamespace(extra_generation_params={})
    assert a1111.unsupported_reason(p) is None
    host.model.is_sd3 = True
    assert "SD3" in a1111.unsupported_reason(p)
    host.model.is_sd3, host.model.cond_stage_key = False, "edit"
    assert "InstructPix2Pix" in a1111.unsupported_reason(p)
    host.model.cond_stage_key, host.sd_unet.current_unet = "txt", object()
    assert "TensorRT" in a1111.unsupported_reason(p)
    host.sd_unet.current_unet = None
    assert "incantations" in a1111.unsupported_reason(SimpleNamespace(
        extra_generation_params={"SCFG Active": True}))


def test_callbacks_come_back_after_a_ui_reload(host):
    a1111.setup(SimpleNamespace(prompt=""), make_params(enabled=True), RunReport())
    host.callbacks["callbacks_cfg_denoiser"].clear()  # script_callbacks.clear_callbacks()
    host.callbacks["callbacks_cfg_denoised"].clear()
    _, report = run_steps(host, make_params(enabled=True))
    assert report.applied == 4
    assert len(host.callbacks["callbacks_cfg_denoised"]) == 1


def test_previews_are_recorded_per_image_and_sub_prompt(host):
    """Second-order samplers call twice per step: steps are counted in sampler steps."""
    report = RunReport(preview_steps=2)
    p = SimpleNamespace(prompt="", iteration=1, batch_size=2)
    _, report = run_steps(host, make_params(enabled=True), batch=((1.0, 0.5), (1.0,)), report=report,
                          p=p, order=2)
    assert report.applied == 8
    assert set(report.previews) == {(2, 0), (2, 1), (3, 0)}  # images 2 and 3 of the job
    assert [s.step for s in report.previews[(2, 0)]] == [2, 4]
    assert report.previews[(3, 0)][0].scale == pytest.approx(7.0)


def test_prompt_tokens_follow_a1111_chunks(host):
    ids = [49406, 320, 2368, 49407] + [49407] * 73
    vocab = {320: "a</w>", 2368: "cat</w>"}
    clip = SimpleNamespace(id_start=49406, id_end=49407, id_pad=49407,
                           tokenize_line=lambda text: ([SimpleNamespace(tokens=ids)], 2),
                           tokenizer=SimpleNamespace(convert_ids_to_tokens=lambda t: [vocab.get(i, "?")
                                                                                       for i in t]))
    host.model.cond_stage_model = clip
    tokens = a1111.prompt_tokens(None, "a cat")
    assert len(tokens) == 77 and tokens[:4] == [None, "a</w>", "cat</w>", None]
    host.model.cond_stage_model = SimpleNamespace(embedders=[clip, None])  # SDXL: CLIP-L
    assert a1111.prompt_tokens(None, "a cat") == tokens


def test_cfg_scale_one_or_less_is_plain_cfg_without_work(host):
    """At γ ≤ 1 there is no guidance to redistribute: plain CFG, as on Forge (which drops uncond)."""
    for scale in (1.0, 0.5):
        plain, _ = run_steps(host, None, cond_scale=scale)
        out, report = run_steps(host, make_params(enabled=True), cond_scale=scale)
        torch.testing.assert_close(out, plain, rtol=0, atol=0)
        assert report.applied == 0 and report.fallbacks == {common.NO_GUIDANCE: 4} and not report.warned


def test_and_sub_prompt_padded_to_a_longer_one_keeps_one_start(host, monkeypatch):
    """A1111 pads the shorter AND sub-prompt by repeating its last vector: position 77 of that row
    is padding, not a START (reconstruct_multicond_batch)."""
    cond, uncond = contexts(2, 1, length=154, uncond_length=154)
    cond[1, 77:] = cond[1, 76]
    masks = []
    gather = a1111.StepCapture._gather
    monkeypatch.setattr(a1111.StepCapture, "_gather",
                        lambda self, rows: masks.append(gather(self, rows).start_mask) or gather(self, rows))
    _, report = run_steps(host, make_params(enabled=True), batch=((1.0, 0.5),), cond_ctx=cond,
                          uncond_ctx=uncond, steps=1)
    assert report.applied == 1
    assert masks[0].sum(1).tolist() == [2, 1]  # cond rows: two chunks / one chunk and its padding
    assert masks[1].sum(1).tolist() == [2, 2]  # the uncond row of each pair: a real 154-token context


def test_projections_no_hook_consumed_are_dropped_after_the_step(host):
    p, report = SimpleNamespace(prompt=""), RunReport()
    a1111.setup(p, make_params(enabled=True), report)
    denoiser = make_denoiser(p, [[1.0]], steps=1)
    x, (cond, uncond) = latent(), contexts(1, 1)
    a1111.on_cfg_denoiser(SimpleNamespace(x=torch.cat([x, x]), sigma=torch.ones(2), denoiser=denoiser))
    host.unet(torch.cat([x, x]), context=torch.cat([cond, uncond]))
    host.unet(x, context=cond)  # an extra pass after the CFG batch (PAG-like): its q/k are not read
    assert any(t.projected for t in a1111._run.targets)
    a1111.on_cfg_denoised(SimpleNamespace(x=torch.randn(2, 4, 8, 8)))
    assert not any(t.projected for t in a1111._run.targets)

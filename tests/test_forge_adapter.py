"""The Forge adapter against a small stand-in for Forge's backend (no Forge needed).

The fakes copy the behaviour the adapter relies on (Forge dfdcbab6): replace-patch lookup
(3-tuple key, then 2-tuple) in BasicTransformerBlock, extra_options, cond_or_uncond chunks in
reversed to_run order, memory splits, token tiling to the LCM, AND weights, cfg-1 optimisation,
the pre-cfg / cfg / post-cfg chain, conditioning modifiers, and clone() deep-copying model_options.
"""

import contextlib
import copy
import math
import sys
import types
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scfg_ext import make_params
from scfg_ext.report import RunReport

DIM, HEADS, CTX, TOKENS = 8, 2, 6, 77


def attention_function(q, k, v, heads, mask=None):
    b, _, inner = q.shape
    q, k, v = (t.view(b, -1, heads, inner // heads).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(b, -1, inner)


class CrossAttention(nn.Module):
    def __init__(self, context_dim):
        super().__init__()
        self.heads = HEADS
        self.to_q = nn.Linear(DIM, DIM, bias=False)
        self.to_k = nn.Linear(context_dim, DIM, bias=False)
        self.to_v = nn.Linear(context_dim, DIM, bias=False)
        self.to_out = nn.Linear(DIM, DIM)

    def forward(self, x, context):
        out = sys.modules["backend.attention"].attention_function(
            self.to_q(x), self.to_k(context), self.to_v(context), self.heads)
        return self.to_out(out)


class BasicTransformerBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn1, self.attn2 = CrossAttention(DIM), CrossAttention(CTX)

    def _attn(self, name, attn, x, context, to):
        table = to.get("patches_replace", {}).get(name, {})
        block = to["block"]
        key = (block[0], block[1], to["block_index"])
        key = key if key in table else block
        if key not in table:
            return attn(x, context)
        extra = {k: v for k, v in to.items() if k not in ("patches", "patches_replace")}
        extra.update(n_heads=HEADS, dim_head=DIM // HEADS)
        out = table[key](attn.to_q(x), attn.to_k(context), attn.to_v(context), extra)
        return attn.to_out(out)

    def forward(self, x, context, to):
        x = x + self._attn("attn1", self.attn1, x, x, to)
        return x + self._attn("attn2", self.attn2, x, context, to)


class SpatialTransformer(nn.Module):
    def __init__(self, depth=1):
        super().__init__()
        self.transformer_blocks = nn.ModuleList(BasicTransformerBlock() for _ in range(depth))

    def forward(self, x, context, to):
        b, c, h, w = x.shape
        y = x.flatten(2).transpose(1, 2)
        for i, block in enumerate(self.transformer_blocks):
            to["block_index"] = i
            y = block(y, context, to)
        return x + y.transpose(1, 2).reshape(b, c, h, w)


class Downsample(nn.Conv2d):
    def __init__(self):
        super().__init__(DIM, DIM, 3, stride=2, padding=1)


class Upsample(nn.Module):
    def forward(self, x, size):
        return F.interpolate(x, size=size, mode="nearest")


def block(*layers):
    return nn.ModuleList(layers)


class IntegratedUNet2DConditionModel(nn.Module):
    """SD1.x's layout in miniature: attention at latent/1, /2, /4 and the middle at latent/8."""

    def __init__(self, depth=1):
        super().__init__()
        st = lambda: SpatialTransformer(depth)  # noqa: E731
        self.input_blocks = nn.ModuleList([
            block(nn.Conv2d(4, DIM, 3, padding=1)), block(st()), block(Downsample()), block(st()),
            block(Downsample()), block(st()), block(Downsample()), block(nn.Conv2d(DIM, DIM, 1))])
        self.middle_block = block(st())
        self.output_blocks = nn.ModuleList([
            block(nn.Conv2d(DIM, DIM, 1), Upsample()), block(st(), Upsample()),
            block(st(), Upsample()), block(st())])
        self.out = nn.Conv2d(DIM, 4, 3, padding=1)

    def forward(self, x, timesteps=None, context=None, transformer_options=None):
        to = transformer_options
        to["original_shape"] = list(x.shape)
        h, sizes = x, []

        def run(layers, h):
            for layer in layers:
                if isinstance(layer, SpatialTransformer):
                    h = layer(h, context, to)
                elif isinstance(layer, Upsample):
                    h = layer(h, sizes.pop())
                else:
                    if isinstance(layer, Downsample):
                        sizes.append(tuple(h.shape[-2:]))
                    h = layer(h)
            return h

        for i, layers in enumerate(self.input_blocks):
            to["block"] = ("input", i)
            h = run(layers, h)
        to["block"] = ("middle", 0)
        h = run(self.middle_block, h)
        for i, layers in enumerate(self.output_blocks):
            to["block"] = ("output", i)
            h = run(layers, h)
        return self.out(h)


class Predictor:
    def calculate_denoised(self, sigma, model_output, model_input):  # Forge's ε prediction
        return model_input - sigma.view(-1, 1, 1, 1) * model_output


class KModel:
    def __init__(self, depth=1):
        torch.manual_seed(0)
        self.diffusion_model = IntegratedUNet2DConditionModel(depth).eval()
        self.predictor = Predictor()

    def apply_model(self, x, sigma, context, transformer_options):
        with torch.no_grad():  # as backend/modules/k_model.py calls it
            eps = self.diffusion_model(x, sigma, context=context, transformer_options=transformer_options)
        return self.predictor.calculate_denoised(sigma, eps, x)  # x0, as Forge's apply_model returns


class UnetPatcher:
    def __init__(self, model):
        self.model = model
        self.model_options = {"transformer_options": {}}
        self.extra_preserved_memory_during_sampling = 0

    def clone(self):
        n = UnetPatcher(self.model)
        n.model_options = copy.deepcopy(self.model_options)
        n.extra_preserved_memory_during_sampling = self.extra_preserved_memory_during_sampling
        return n

    def set_model_patch_replace(self, patch, name, block_name, number, transformer_index=None):
        to = self.model_options["transformer_options"].copy()
        to["patches_replace"] = {k: dict(v) for k, v in to.get("patches_replace", {}).items()}
        key = (block_name, number) if transformer_index is None else (block_name, number, transformer_index)
        to["patches_replace"].setdefault(name, {})[key] = patch
        self.model_options["transformer_options"] = to

    def add_conditioning_modifier(self, fn):
        self.model_options.setdefault("conditioning_modifiers", []).append(fn)

    def add_sampler_pre_cfg_function(self, fn):
        self.model_options.setdefault("sampler_pre_cfg_function", []).append(fn)

    def set_model_sampler_cfg_function(self, fn, disable_cfg1_optimization=False):
        self.model_options["sampler_cfg_function"] = fn

    def set_model_sampler_post_cfg_function(self, fn, disable_cfg1_optimization=False):
        self.model_options["sampler_post_cfg_function"] = \
            [*self.model_options.get("sampler_post_cfg_function", []), fn]
        if disable_cfg1_optimization:
            self.model_options["disable_cfg1_optimization"] = True

    def add_extra_preserved_memory_during_sampling(self, n):
        self.extra_preserved_memory_during_sampling += n


class ConditionCrossAttn:
    """Forge's: contexts concatenate when their lengths' LCM is at most 4 times the shorter one."""

    def __init__(self, cond):
        self.cond = cond

    def can_concat(self, other):
        a, b = self.cond.shape[1], other.cond.shape[1]
        return math.lcm(a, b) // min(a, b) <= 4


def cond_equal_size(c1, c2):
    return c1.keys() == c2.keys() and all(c1[k].can_concat(c2[k]) for k in c1)


def calc_cond_uncond_batch(model, cond, uncond, x, sigma, options, max_chunks=None):
    """Forge's batching: the entries that concatenate with the first one left, highest index first,
    at most ``max_chunks`` per UNet call (memory), contexts tiled to the LCM."""
    to_run = [(c, 0) for c in cond] + [(u, 1) for u in (uncond or [])]
    out = {0: torch.zeros_like(x), 1: torch.zeros_like(x)}
    count = {0: torch.full_like(x, 1e-37), 1: torch.full_like(x, 1e-37)}
    while to_run:
        fits = [i for i, (c, _) in enumerate(to_run)
                if cond_equal_size(c["model_conds"], to_run[0][0]["model_conds"])][::-1]
        chosen = [to_run.pop(i) for i in fits[:max_chunks or len(fits)]]
        lengths = [c["model_conds"]["c_crossattn"].cond.shape[1] for c, _ in chosen]
        lcm = math.lcm(*lengths)
        ctx = torch.cat([c["model_conds"]["c_crossattn"].cond.repeat(1, lcm // n, 1)
                         for (c, _), n in zip(chosen, lengths, strict=True)])
        to = dict(options.get("transformer_options", {}))
        to["cond_or_uncond"] = [label for _, label in chosen]
        to["sigmas"] = sigma
        output = model.apply_model(torch.cat([x] * len(chosen)), torch.cat([sigma] * len(chosen)), ctx, to)
        for o, (c, label) in zip(output.chunk(len(chosen)), chosen, strict=True):
            weight = c.get("strength", 1.0)
            out[label] += o * weight
            count[label] += weight
    return out[0] / count[0], out[1] / count[1]


def sampling_function(unet, x, sigma, cond, uncond, cond_scale, max_chunks=None):
    model, options = unet.model, unet.model_options
    for modifier in options.get("conditioning_modifiers", []):
        model, x, sigma, uncond, cond, cond_scale, options, _ = modifier(
            model, x, sigma, uncond, cond, cond_scale, options, 0)
    return sampling_function_inner(model, x, sigma, uncond, cond, cond_scale, options, max_chunks)


def sampling_function_inner(model, x, sigma, uncond, cond, cond_scale, options, max_chunks=None):
    edit = sum(c.get("strength", 1) for c in cond)
    uncond_ = None if math.isclose(cond_scale, 1.0) and not options.get("disable_cfg1_optimization") \
        else uncond
    for fn in options.get("sampler_pre_cfg_function", []):
        model, cond, uncond_, x, sigma, options = fn(model, cond, uncond_, x, sigma, options)
    c, u = calc_cond_uncond_batch(model, cond, uncond_, x, sigma, options, max_chunks)
    if "sampler_cfg_function" in options:
        args = {"cond": x - c, "uncond": x - u, "cond_scale": cond_scale, "timestep": sigma, "input": x,
                "sigma": sigma, "cond_denoised": c, "uncond_denoised": u, "model": model,
                "model_options": options}
        result = x - options["sampler_cfg_function"](args)
    elif not math.isclose(edit, 1.0):
        result = u + (c - u) * cond_scale * edit
    else:
        result = u + (c - u) * cond_scale
    for fn in options.get("sampler_post_cfg_function", []):
        result = fn({"denoised": result, "cond": cond, "uncond": uncond, "model": model,
                     "uncond_denoised": u, "cond_denoised": c, "sigma": sigma,
                     "model_options": options, "input": x})
    return result


# ----- fixtures ---------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def fake_forge(monkeypatch):
    backend = types.ModuleType("backend")
    backend.attention = types.ModuleType("backend.attention")
    backend.attention.attention_function = attention_function
    backend.nn = types.ModuleType("backend.nn")
    backend.nn.unet = types.ModuleType("backend.nn.unet")
    backend.nn.unet.IntegratedUNet2DConditionModel = IntegratedUNet2DConditionModel
    backend.sampling = types.ModuleType("backend.sampling")
    backend.sampling.sampling_function = types.ModuleType("backend.sampling.sampling_function")
    backend.sampling.sampling_function.cond_equal_size = cond_equal_size
    for name, module in (("backend", backend), ("backend.attention", backend.attention),
                         ("backend.nn", backend.nn), ("backend.nn.unet", backend.nn.unet),
                         ("backend.sampling", backend.sampling),
                         ("backend.sampling.sampling_function", backend.sampling.sampling_function)):
        monkeypatch.setitem(sys.modules, name, module)
    from scfg_ext.hosts import forge
    yield forge
    forge.teardown()


MODELS = {}


def make_p(batch=1, size=(16, 16), steps=4, depth=1, sdxl=False):
    if depth not in MODELS:
        MODELS[depth] = KModel(depth)
    unet = UnetPatcher(MODELS[depth])
    sd_model = SimpleNamespace(forge_objects=SimpleNamespace(unet=unet), is_sd1=not sdxl,
                               is_sd2=False, is_sdxl=sdxl)
    denoiser = SimpleNamespace(step=0, total_steps=steps)
    return SimpleNamespace(sd_model=sd_model, width=size[1] * 8, height=size[0] * 8, batch_size=batch,
                           sampler=SimpleNamespace(model_wrap_cfg=denoiser))


def conds(batch, seeds=(1,), tokens=TOKENS, strengths=None):
    """One entry per AND sub-prompt; ``tokens`` may be a list (one length per sub-prompt)."""
    out = []
    for i, seed in enumerate(seeds):
        g = torch.Generator().manual_seed(seed)
        length = tokens[i] if isinstance(tokens, (list, tuple)) else tokens
        context = torch.randn(batch, length, CTX, generator=g)
        entry = {"model_conds": {"c_crossattn": ConditionCrossAttn(context)}}
        if strengths:
            entry["strength"] = strengths[i]
        out.append(entry)
    return out


def latent(batch, size=(16, 16), seed=0):
    return torch.randn(batch, 4, *size, generator=torch.Generator().manual_seed(seed))


def step(p, x, cond, uncond, scale=7.0, max_chunks=None, sigma=1.0):
    return sampling_function(p.sd_model.forge_objects.unet, x, torch.full((x.shape[0],), sigma),
                             cond, uncond, scale, max_chunks)


def run(forge, p, cond, uncond, scale=7.0, max_chunks=None, **values):
    report = RunReport(host="forge")
    forge.setup(p, make_params(enabled=True, **values), report)
    x = latent(p.batch_size, (p.height // 8, p.width // 8))
    return step(p, x, cond, uncond, scale, max_chunks), report


# ----- tests ------------------------------------------------------------------------------

def test_levels_of_the_sd1_layout(fake_forge):
    from scfg_ext.hosts import common

    sites = common.transformer_sites(MODELS.setdefault(1, KModel()).diffusion_model)
    blocks = {s.key: s.factor for s in sites}
    assert blocks == {("input", 1, 0): 1, ("input", 3, 0): 2, ("input", 5, 0): 4, ("middle", 0, 0): 8,
                      ("output", 1, 0): 4, ("output", 2, 0): 2, ("output", 3, 0): 1}


def test_rate_one_is_plain_cfg_bit_for_bit_and_scfg_differs(fake_forge):
    p = make_p(batch=2)
    cond, uncond = conds(2, (1,)), conds(2, (2,))
    plain = step(p, latent(2), cond, uncond)
    same, report = run(fake_forge, p, cond, uncond, min_rate=1.0, max_rate=1.0)
    assert torch.equal(same, plain) and report.applied == 1
    assert report.rate_min == report.rate_max == 1.0
    fake_forge.teardown()
    changed, report = run(fake_forge, p, cond, uncond)
    assert report.applied == 1 and not report.fallbacks
    assert not torch.allclose(changed, plain)


def test_hooks_on_the_selected_levels_only_and_teardown_restores(fake_forge):
    p = make_p()
    original = p.sd_model.forge_objects.unet
    fake_forge.setup(p, make_params(enabled=True), RunReport())
    patched = p.sd_model.forge_objects.unet
    assert patched is not original and original.model_options == {"transformer_options": {}}
    table = patched.model_options["transformer_options"]["patches_replace"]
    assert set(table["attn1"]) == set(table["attn2"]) == {("input", 5), ("middle", 0), ("output", 1)}
    assert "sampler_post_cfg_function" in fake_forge.installed()
    assert "sampler_cfg_function" not in patched.model_options
    fake_forge.teardown()
    assert p.sd_model.forge_objects.unet is original and fake_forge.installed() == []
    fake_forge.setup(p, make_params(enabled=True, levels="2"), RunReport())
    table = p.sd_model.forge_objects.unet.model_options["transformer_options"]["patches_replace"]
    assert set(table["attn1"]) == {("input", 3), ("output", 2)}


def test_setup_twice_without_reset_does_not_stack(fake_forge):
    p = make_p()
    fake_forge.setup(p, make_params(enabled=True), RunReport())
    first = p.sd_model.forge_objects.unet
    fake_forge._current = None  # as if teardown never ran: setup clones the patched UNet
    fake_forge.setup(p, make_params(enabled=True), RunReport())
    options = p.sd_model.forge_objects.unet.model_options
    assert p.sd_model.forge_objects.unet is not first
    for name in ("conditioning_modifiers", "sampler_pre_cfg_function", "sampler_post_cfg_function"):
        assert len(options[name]) == 1
    patch = options["transformer_options"]["patches_replace"]["attn1"][("middle", 0)]
    assert patch._scfg_prev is None


def test_deep_copied_options_share_the_run(fake_forge):
    p = make_p()
    cond, uncond = conds(1, (1,)), conds(1, (2,))
    report = RunReport()
    fake_forge.setup(p, make_params(enabled=True), report)
    p.sd_model.forge_objects.unet = p.sd_model.forge_objects.unet.clone()  # a later extension
    step(p, latent(1), cond, uncond)
    assert report.applied == 1


@pytest.mark.parametrize("max_chunks", [None, 1])
def test_split_cond_uncond_calls_give_the_batched_result(fake_forge, max_chunks):
    p = make_p(batch=2)
    cond, uncond = conds(2, (1,)), conds(2, (2,))
    batched, _ = run(fake_forge, p, cond, uncond)
    fake_forge.teardown()
    split, report = run(fake_forge, p, cond, uncond, max_chunks=max_chunks)
    assert report.applied == 1 and not report.fallbacks
    torch.testing.assert_close(split, batched, rtol=1e-4, atol=1e-5)


def test_batch_images_are_independent(fake_forge):
    cond2, uncond2 = conds(2, (1,)), conds(2, (2,))
    both, _ = run(fake_forge, make_p(batch=2), cond2, uncond2)
    fake_forge.teardown()
    swap = [1, 0]
    cond_s, uncond_s = ([{"model_conds": {"c_crossattn": ConditionCrossAttn(
        c[0]["model_conds"]["c_crossattn"].cond[swap])}}] for c in (cond2, uncond2))
    p = make_p(batch=2)
    fake_forge.setup(p, make_params(enabled=True), RunReport())
    swapped = step(p, latent(2)[swap], cond_s, uncond_s)
    torch.testing.assert_close(swapped, both[swap], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("strengths", [None, (0.7, 0.5)])
def test_and_prompts(fake_forge, strengths):
    p = make_p(batch=2)
    cond, uncond = conds(2, (1, 3), strengths=strengths), conds(2, (2,))
    plain = step(p, latent(2), cond, uncond)
    same, report = run(fake_forge, p, cond, uncond, min_rate=1.0, max_rate=1.0)
    assert report.applied == 1 and torch.equal(same, plain)
    fake_forge.teardown()
    split, report = run(fake_forge, p, cond, uncond, max_chunks=2)
    assert report.applied == 1 and not report.fallbacks and not torch.allclose(split, plain)


@pytest.mark.parametrize("tokens", [TOKENS, [TOKENS, 5 * TOKENS]])
def test_and_sub_prompts_keep_their_weights_in_any_order(fake_forge, tokens):
    """Chunks reach the UNet in Forge's batching order; each must be matched to its own sub-prompt.

    5 x 77 tokens cannot be concatenated with 77, so that sub-prompt runs in a UNet call of its own.
    """
    p = make_p()
    cond, uncond = conds(1, (1, 3), tokens=tokens, strengths=(0.9, 0.3)), conds(1, (2,))
    results = []
    for entries, chunks in ((cond, None), (cond[::-1], None), (cond, 1)):
        report = RunReport(preview_steps=4)
        fake_forge.setup(p, make_params(enabled=True, strength=3.0), report)
        results.append(step(p, latent(1), entries, uncond, max_chunks=chunks))
        assert report.applied == 1 and not report.fallbacks
        assert set(report.previews) == {(0, 0), (0, 1)}
        fake_forge.teardown()
    # (matching the chunks to the wrong sub-prompts moves the result by about 0.1)
    torch.testing.assert_close(results[1], results[0], rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(results[2], results[0], rtol=1e-3, atol=1e-4)


def test_prompt_tokens():
    from scfg_ext.hosts import forge

    class Tokenizer:
        def convert_ids_to_tokens(self, ids):
            return [f"t{i}</w>" for i in ids]

    chunk = SimpleNamespace(tokens=[49406, 320, 1929, 49407, 49407])
    engine = SimpleNamespace(tokenize_line=lambda text: ([chunk], 2), id_start=49406, id_end=49407,
                             id_pad=49407, tokenizer=Tokenizer())
    p = SimpleNamespace(sd_model=SimpleNamespace(text_processing_engine_l=engine))
    assert forge.prompt_tokens(p, "a cat") == [None, "t320</w>", "t1929</w>", None, None]


def test_long_prompt_tiles_the_uncond(fake_forge):
    p = make_p()
    cond, uncond = conds(1, (1,), tokens=2 * TOKENS), conds(1, (2,))
    _, report = run(fake_forge, p, cond, uncond)
    assert report.applied == 1 and not report.fallbacks


def test_cfg_one_and_missing_uncond_are_plain(fake_forge):
    p = make_p()
    cond, uncond = conds(1, (1,)), conds(1, (2,))
    plain = step(p, latent(1), cond, uncond, scale=1.0)
    out, report = run(fake_forge, p, cond, uncond, scale=1.0)
    assert torch.equal(out, plain) and report.applied == 0
    assert report.fallbacks == {"CFG scale ≤ 1 (no guidance to redistribute)": 1} and not report.warned


def test_step_window(fake_forge):
    p = make_p(steps=5)
    cond, uncond = conds(1, (1,)), conds(1, (2,))
    report = RunReport()
    fake_forge.setup(p, make_params(enabled=True, start=0.25, end=0.5), report)
    for i in range(5):
        p.sampler.model_wrap_cfg.step = i
        step(p, latent(1), cond, uncond)
    assert report.applied == 2 and report.fallbacks["step outside S-CFG's start/end"] == 3


def test_bypasses_regional_conds_and_wrappers(fake_forge):
    p = make_p()
    cond, uncond = conds(1, (1,)), conds(1, (2,))
    cond[0]["area"] = (16, 16, 0, 0)
    _, report = run(fake_forge, p, cond, uncond)
    assert report.applied == 0 and report.warned == {
        "area, mask or timestep-range conditioning (regional prompts)"}
    fake_forge.teardown()
    report = RunReport()
    fake_forge.setup(p, make_params(enabled=True), report)
    p.sd_model.forge_objects.unet.model_options["model_function_wrapper"] = lambda f, a: None
    options = p.sd_model.forge_objects.unet.model_options
    x = latent(1)
    options["conditioning_modifiers"][0](None, x, None, uncond, cond, 7.0, options, 0)
    options["sampler_pre_cfg_function"][0](None, conds(1, (1,)), uncond, x, None, options)
    assert fake_forge._current[3].step.skip[0].startswith("a UNet function wrapper")


def test_chains_existing_replace_patches(fake_forge):
    p = make_p()
    calls = []

    def other(q, k, v, extra):  # e.g. IP-Adapter on a 2-tuple key, SAG on a 3-tuple key
        calls.append(extra["block"])
        return attention_function(q, k, v, extra["n_heads"]) * 0.5

    base = p.sd_model.forge_objects.unet
    base.set_model_patch_replace(other, "attn2", "input", 5)
    base.set_model_patch_replace(other, "attn1", "middle", 0, 0)
    cond, uncond = conds(1, (1,)), conds(1, (2,))
    plain = step(p, latent(1), cond, uncond)
    calls.clear()
    same, report = run(fake_forge, p, cond, uncond, min_rate=1.0, max_rate=1.0)
    assert torch.equal(same, plain) and report.applied == 1
    assert calls.count(("input", 5)) == 1 and calls.count(("middle", 0)) == 1  # one batched call
    table = p.sd_model.forge_objects.unet.model_options["transformer_options"]["patches_replace"]
    assert ("middle", 0, 0) in table["attn1"] and table["attn1"][("middle", 0, 0)]._scfg_prev is other


def test_a_later_pass_patch_on_a_2tuple_key_still_applies(fake_forge):
    """PAG's extra pass puts its own attn1 on ("middle", 0); ours must not shadow it."""
    p = make_p()
    cond, uncond = conds(1, (1,)), conds(1, (2,))
    seen = []

    def pag(args):
        options = copy.deepcopy(args["model_options"])
        UnetPatcher.set_model_patch_replace(SimpleNamespace(model_options=options),
                                            lambda q, k, v, e: seen.append(1) or v, "attn1", "middle", 0)
        degraded, _ = calc_cond_uncond_batch(args["model"], args["cond"], None, args["input"],
                                             args["sigma"], options)
        return args["denoised"] + (args["cond_denoised"] - degraded) * 2.0

    p.sd_model.forge_objects.unet.set_model_sampler_post_cfg_function(pag)
    _, report = run(fake_forge, p, cond, uncond)
    assert seen == [1] and report.applied == 1 and not report.fallbacks


def test_chains_an_existing_cfg_function(fake_forge):
    """Dynamic Thresholding's slot: S-CFG hands it u + r(c - u) instead of taking the slot."""
    p = make_p()
    seen = []

    def dynthres(args):
        seen.append(args["cond"])
        return args["uncond"] + (args["cond"] - args["uncond"]) * args["cond_scale"]

    p.sd_model.forge_objects.unet.set_model_sampler_cfg_function(dynthres)
    cond, uncond = conds(1, (1,)), conds(1, (2,))
    plain = step(p, latent(1), cond, uncond)
    out, report = run(fake_forge, p, cond, uncond)
    options = p.sd_model.forge_objects.unet.model_options
    assert options["sampler_cfg_function"]._scfg_prev is dynthres
    assert "sampler_post_cfg_function" not in options
    assert report.applied == 1 and len(seen) == 2 and not torch.equal(seen[0], seen[1])
    assert not torch.allclose(out, plain)
    fake_forge.teardown()
    same, _ = run(fake_forge, p, cond, uncond, min_rate=1.0, max_rate=1.0)
    torch.testing.assert_close(same, plain)


@pytest.mark.parametrize("fault", ["cross_attention", "result", "oom"])
def test_a_fault_gives_plain_cfg_and_one_warning(fake_forge, fault, caplog):
    p = make_p()
    cond, uncond = conds(1, (1,)), conds(1, (2,))
    plain = step(p, latent(1), cond, uncond)
    report = RunReport()
    fake_forge.setup(p, make_params(enabled=True, test_fault=fault), report)
    outs = [step(p, latent(1), cond, uncond) for _ in range(3)]
    assert all(torch.equal(o, plain) for o in outs)
    assert report.applied == 0 and sum(report.fallbacks.values()) == 3 and len(report.warned) == 1
    assert sum("injected test fault" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("fault", ["setup", "teardown"])
def test_setup_or_teardown_that_raises_gives_the_model_its_unet_back(fake_forge, fault):
    p = make_p()
    original = p.sd_model.forge_objects.unet
    params = make_params(enabled=True, test_fault=fault)
    if fault == "setup":
        with pytest.raises(RuntimeError, match="injected test fault in setup"):
            fake_forge.setup(p, params, RunReport())
        assert fake_forge.installed()  # the switch happened: the script's teardown undoes it
    else:
        fake_forge.setup(p, params, RunReport())
    with pytest.raises(RuntimeError, match=f"injected test fault in {fault}") if fault == "teardown" \
            else contextlib.nullcontext():
        fake_forge.teardown()
    assert p.sd_model.forge_objects.unet is original and fake_forge.installed() == []


def test_a_replaced_patch_is_detected(fake_forge):
    p = make_p()
    cond, uncond = conds(1, (1,)), conds(1, (2,))
    report = RunReport()
    fake_forge.setup(p, make_params(enabled=True), report)
    p.sd_model.forge_objects.unet.set_model_patch_replace(
        lambda q, k, v, e: attention_function(q, k, v, e["n_heads"]), "attn2", "output", 1, 0)
    step(p, latent(1), cond, uncond)
    assert report.applied == 0 and report.warned == {"another extension replaced S-CFG's attention patches"}


def test_non_square_and_sdxl_style_depth(fake_forge):
    p = make_p(batch=1, size=(20, 13), depth=2, sdxl=True)
    cond, uncond = conds(1, (1,)), conds(1, (2,))
    out, report = run(fake_forge, p, cond, uncond)
    assert out.shape == (1, 4, 20, 13) and report.applied == 1 and not report.fallbacks
    assert fake_forge._current[3].factors == (4, 8)  # the levels this UNet has decide, not the flag


def reference_recorder(noise_seed=5):
    """Forge's Reference-only modifier: a nested cfg-1 sampling call on a noised reference latent."""
    def modifier(model, x, sigma, uncond, cond, cond_scale, options, seed):
        xt = torch.randn(x.shape, generator=torch.Generator().manual_seed(noise_seed))
        sampling_function_inner(model, xt, sigma, uncond, cond, 1.0, options)
        return model, x, sigma, uncond, cond, cond_scale, options, seed
    return modifier


@pytest.mark.parametrize("reference_first", [True, False])
def test_a_nested_reference_pass_in_any_order_leaves_the_step_applied(fake_forge, reference_first):
    cond, uncond = conds(1, (1,)), conds(1, (2,))
    p = make_p()
    expected, _ = run(fake_forge, p, cond, uncond)
    fake_forge.teardown()
    p = make_p()
    unet = p.sd_model.forge_objects.unet
    if reference_first:
        unet.add_conditioning_modifier(reference_recorder())
    report = RunReport()
    fake_forge.setup(p, make_params(enabled=True), report)
    if not reference_first:  # installed after S-CFG: runs between our modifier and our pre-cfg
        unet = p.sd_model.forge_objects.unet
        unet.add_conditioning_modifier(reference_recorder())
    out = step(p, latent(1, (p.height // 8, p.width // 8)), cond, uncond)
    assert report.applied == 1 and not report.fallbacks
    torch.testing.assert_close(out, expected)


def test_a_modifier_that_replaces_the_latent_is_reported(fake_forge):
    p = make_p()
    report = RunReport()
    fake_forge.setup(p, make_params(enabled=True), report)
    p.sd_model.forge_objects.unet.add_conditioning_modifier(
        lambda model, x, *rest: (model, x.clone(), *rest))
    cond, uncond = conds(1, (1,)), conds(1, (2,))
    for _ in range(2):
        step(p, latent(1), cond, uncond)
    assert report.applied == 0 and len(report.warned) == 1
    assert "not recognised" in next(iter(report.warned))


def test_teardown_makes_a_lingering_clone_pass_through(fake_forge):
    p = make_p()
    cond, uncond = conds(1, (1,)), conds(1, (2,))
    report = RunReport()
    fake_forge.setup(p, make_params(enabled=True), report)
    patched = p.sd_model.forge_objects.unet
    fake_forge.teardown()
    p.sd_model.forge_objects.unet = patched
    out = step(p, latent(1), cond, uncond)
    p.sd_model.forge_objects.unet = UnetPatcher(patched.model)
    plain = step(p, latent(1), cond, uncond)
    assert torch.equal(out, plain) and report.applied == 0


def test_teardown_mid_step_drops_the_armed_latent(fake_forge):
    """Interrupted between the conditioning modifier and the pre-cfg: nothing of the step is kept."""
    p = make_p()
    fake_forge.setup(p, make_params(enabled=True), RunReport())
    run_state = fake_forge._current[3]
    options = p.sd_model.forge_objects.unet.model_options
    options["conditioning_modifiers"][0](None, latent(1), None, conds(1, (2,)), conds(1, (1,)), 7.0,
                                         options, 0)
    assert run_state.armed is not None
    fake_forge.teardown()
    assert run_state.armed is None and run_state.step is None and run_state.p is None


def test_unsupported_models(fake_forge):
    p = make_p()
    assert fake_forge.unsupported_reason(p) is None
    flux = SimpleNamespace(sd_model=SimpleNamespace(forge_objects=p.sd_model.forge_objects, is_sd1=False,
                                                    is_sd2=False, is_sdxl=False, is_sd3=False))
    assert "does not apply" in fake_forge.unsupported_reason(flux)
    p.sd_model.forge_objects.unet = UnetPatcher(SimpleNamespace(diffusion_model=nn.Linear(1, 1)))
    assert "not Forge's UNet" in fake_forge.unsupported_reason(p)
    assert "forge_objects" in fake_forge.unsupported_reason(SimpleNamespace(sd_model=object()))


# ----- behaviours shared with the A1111 adapter (issue: one S-CFG on every host) -----------

def test_the_refiner_reload_is_followed(fake_forge):
    """apply_refiner loads another model object mid-pass; its UNet must be patched as well."""
    p = make_p()
    cond, uncond = conds(1, (1,)), conds(1, (2,))
    report = RunReport()
    fake_forge.setup(p, make_params(enabled=True), report)
    step(p, latent(1), cond, uncond)
    refiner = make_p(depth=2).sd_model  # a new model object, as forge_model_reload makes
    p.sd_model = refiner
    fake_forge.on_cfg_denoiser(SimpleNamespace(denoiser=SimpleNamespace(p=p)))
    step(p, latent(1), cond, uncond)
    assert report.applied == 2 and not report.warned
    assert p.sd_model.forge_objects.unet.model_options["conditioning_modifiers"]
    fake_forge.on_cfg_denoiser(SimpleNamespace(denoiser=SimpleNamespace(p=p)))  # same model: no re-patch
    assert fake_forge._current[0] is refiner
    fake_forge.teardown()
    assert "conditioning_modifiers" not in p.sd_model.forge_objects.unet.model_options


def test_a_cfg_function_set_after_setup_gives_plain_cfg_and_a_warning(fake_forge):
    """Dynamic Thresholding enabled after S-CFG: its clamp must not get our correction on top."""
    p = make_p()
    cond, uncond = conds(1, (1,)), conds(1, (2,))

    def clamp(args):
        return (args["uncond"] + (args["cond"] - args["uncond"]) * args["cond_scale"]).clamp(-1, 1)

    base = make_p()
    base.sd_model.forge_objects.unet.set_model_sampler_cfg_function(clamp)
    expected = step(base, latent(1), cond, uncond)
    report = RunReport()
    fake_forge.setup(p, make_params(enabled=True), report)
    p.sd_model.forge_objects.unet.set_model_sampler_cfg_function(clamp)
    out = step(p, latent(1), cond, uncond)
    assert torch.equal(out, expected)
    assert report.applied == 0 and report.warned == {
        "another extension changed the CFG function after S-CFG's setup"}


def test_and_sub_prompts_get_rates_from_their_own_predictions(fake_forge, monkeypatch):
    """u + γ·Σⱼ w̄ⱼ·rⱼ·(cⱼ − u), each rⱼ from cⱼ, as A1111 gives (not from the averaged cond)."""
    p = make_p(batch=2)
    cond, uncond = conds(2, (1, 3), strengths=(0.7, 0.5)), conds(2, (2,))
    alone = []
    for j in range(2):  # each sub-prompt's own x0, from Forge itself
        seen = []
        q = make_p(batch=2)
        q.sd_model.forge_objects.unet.set_model_sampler_post_cfg_function(
            lambda a, seen=seen: seen.append(a["cond_denoised"]) or a["denoised"])
        step(q, latent(2), [cond[j]], uncond)
        alone.append(seen[0])
    results, result = [], fake_forge.StepCapture.result
    monkeypatch.setattr(fake_forge.StepCapture, "result",
                        lambda self, pairs, c, u: results.append((pairs, c, u, result(self, pairs, c, u)))
                        or results[-1][3])
    plain = step(make_p(batch=2), latent(2), cond, uncond)
    out, report = run(fake_forge, p, cond, uncond, strength=2.0)
    assert report.applied == 1 and len(results) == 2
    weights = (0.7 / 1.2, 0.5 / 1.2)
    for j, (pairs, c, _, _) in enumerate(results):
        torch.testing.assert_close(c, alone[j], rtol=1e-4, atol=1e-5)
        assert [pair.scale for pair in pairs] == pytest.approx([7.0 * 1.2 * weights[j]] * 2)
    u = results[0][2]
    expected = plain + 7.0 * 1.2 * sum(w * (r.rate - 1) * (c - u)
                                       for w, (_, c, _, r) in zip(weights, results, strict=True))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_the_scale_is_the_one_combined_not_the_one_armed(fake_forge):
    """A conditioning modifier after ours changes the scale: S-CFG uses the scale CFG used."""
    cond, uncond = conds(1, (1,)), conds(1, (2,))
    direct, _ = run(fake_forge, make_p(), cond, uncond, scale=5.0)
    fake_forge.teardown()
    p = make_p()
    report = RunReport()
    fake_forge.setup(p, make_params(enabled=True), report)
    p.sd_model.forge_objects.unet.add_conditioning_modifier(
        lambda model, x, t, u, c, scale, options, seed: (model, x, t, u, c, 5.0, options, seed))
    out = step(p, latent(1), cond, uncond, scale=7.0)
    assert report.applied == 1
    torch.testing.assert_close(out, direct, rtol=1e-5, atol=1e-5)


def test_a_post_cfg_function_before_ours_is_detected(fake_forge):
    p = make_p()
    cond, uncond = conds(1, (1,)), conds(1, (2,))
    report = RunReport()
    fake_forge.setup(p, make_params(enabled=True), report)
    options = p.sd_model.forge_objects.unet.model_options
    options["sampler_post_cfg_function"].insert(0, lambda a: a["denoised"].clamp(-0.5, 0.5))
    step(p, latent(1), cond, uncond)
    assert report.applied == 0 and any("not Forge's plain CFG" in w for w in report.warned)


def test_a_clone_that_drops_other_patches_gets_them_back():
    """A patcher whose clone() starts empty (one 2026 Neo unet.py): earlier extensions' model_options
    and LoRA patches are copied back, so S-CFG never removes them for the pass."""
    from scfg_ext.hosts import forge as adapter
    from scfg_ext.report import RunReport

    class Patcher:
        def __init__(self, options=None, patches=None):
            self.model_options = options if options is not None else {}
            self.patches = patches if patches is not None else {}

        def clone(self):
            return Patcher()

    def cfg(args):  # functions are shared by deepcopy, as by ComfyUI's clone
        return args

    original = Patcher({"sampler_cfg_function": cfg, "transformer_options": {"patches": {"x": [1]}}},
                       {"lora.weight": [("lora", 1.0)]})
    report = RunReport()
    clone = adapter._clone(original, report)
    assert clone.model_options["sampler_cfg_function"] is cfg and clone.patches == original.patches
    assert clone.model_options is not original.model_options  # the clone's own, as clone() makes it
    assert report.notes == ["the host's UNet clone dropped model_options, patches: copied back"]
    faithful = Patcher({"a": 1})
    faithful.clone = lambda: Patcher({"a": 1})
    report = RunReport()
    adapter._clone(faithful, report)
    assert report.notes == []

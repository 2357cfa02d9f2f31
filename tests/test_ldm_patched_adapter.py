"""The ldm_patched adapter (reForge, Forge Classic): Forge's adapter with ldm_patched's module paths,
against the Forge stand-ins, and reForge's newer sampler form (pre-cfg functions after the UNet)."""

import math
import sys
import types

import pytest
import torch

from scfg_ext import make_params
from scfg_ext.report import RunReport
from tests import test_forge_adapter as F

fake_forge = F.fake_forge  # the stand-in UNet's own attention and patcher
UNET_MODULE = "ldm_patched.ldm.modules.diffusionmodules.openaimodel"


@pytest.fixture(params=["classic", "reforge"])
def host(request, monkeypatch, fake_forge):
    """Fake ldm_patched modules; reForge's samplers has calc_cond_batch, Classic's does not."""
    names = ["ldm_patched", "ldm_patched.ldm", "ldm_patched.ldm.modules", "ldm_patched.ldm.modules.attention",
             "ldm_patched.ldm.modules.diffusionmodules", UNET_MODULE, "ldm_patched.modules",
             "ldm_patched.modules.samplers"]
    modules = {name: types.ModuleType(name) for name in names}
    modules["ldm_patched.ldm.modules.attention"].optimized_attention = F.attention_function
    modules[UNET_MODULE].UNetModel = F.IntegratedUNet2DConditionModel
    modules["ldm_patched.modules.samplers"].cond_equal_size = F.cond_equal_size
    if request.param == "reforge":
        modules["ldm_patched.modules.samplers"].calc_cond_batch = object()
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(modules[parent], child, module)
    from scfg_ext.hosts import forge

    monkeypatch.setattr(forge, "BACKEND", forge.BACKEND)  # restored after the test (the import
    from scfg_ext.hosts import ldm_patched  # of ldm_patched inside a host reconfigures it)

    ldm_patched.configure()
    monkeypatch.setattr(F.KModel, "model_sampling", property(lambda self: self.predictor), raising=False)
    yield request.param, ldm_patched
    ldm_patched.teardown()


def reforge_sampling(unet, x, sigma, cond, uncond, cond_scale, modifiers=True):
    """reForge's CFGDenoiser.forward: the conditioning modifiers, then sampling_function: cfg-1
    optimisation, the UNet batch, the newer fn(args) pre-cfg functions, plain CFG, post-cfg
    functions (with cond_scale)."""
    model, options = unet.model, unet.model_options
    for modifier in options.get("conditioning_modifiers", []) if modifiers else []:
        model, x, sigma, uncond, cond, cond_scale, options, _ = modifier(
            model, x, sigma, uncond, cond, cond_scale, options, 0)
    uncond_ = None if math.isclose(cond_scale, 1.0) else uncond
    c, u = F.calc_cond_uncond_batch(model, cond, uncond_, x, sigma, options)
    for fn in options.get("sampler_pre_cfg_function", []):
        c, u = fn({"conds": [cond, uncond_], "conds_out": [c, u], "cond_scale": cond_scale, "timestep": sigma,
                   "input": x, "sigma": sigma, "model": model, "model_options": options})
    result = u + (c - u) * cond_scale
    for fn in options.get("sampler_post_cfg_function", []):
        result = fn({"denoised": result, "cond": cond, "uncond": uncond_, "cond_scale": cond_scale,
                     "model": model, "uncond_denoised": u, "cond_denoised": c, "sigma": sigma,
                     "model_options": options, "input": x})
    return result


def step(kind, p, x, cond, uncond, scale=7.0):
    if kind == "classic":
        return F.step(p, x, cond, uncond, scale)
    sigma = torch.full((x.shape[0],), 1.0)
    return reforge_sampling(p.sd_model.forge_objects.unet, x, sigma, cond, uncond, scale)


def test_scfg_acts_and_rate_one_is_plain_cfg(host):
    kind, adapter = host
    p = F.make_p(batch=2)
    cond, uncond = F.conds(2, (1, 3), strengths=(0.7, 0.5)), F.conds(2, (2,))
    plain = step(kind, p, F.latent(2), cond, uncond)
    report = RunReport()
    adapter.setup(p, make_params(enabled=True, min_rate=1.0, max_rate=1.0), report)
    same = step(kind, p, F.latent(2), cond, uncond)
    assert report.applied == 1 and torch.equal(same, plain)
    adapter.setup(p, make_params(enabled=True), report)
    on = step(kind, p, F.latent(2), cond, uncond)
    assert report.applied == 2 and not report.fallbacks and not torch.allclose(on, plain)
    hooks = adapter.installed()
    assert ("sampler_pre_cfg_function" in hooks) == (kind == "classic")
    adapter.teardown()
    assert adapter.installed() == []


def test_cfg_one_and_a_host_skipped_uncond_are_plain_without_warning(host):
    kind, adapter = host
    p, report = F.make_p(), RunReport()
    cond, uncond = F.conds(1, (1,)), F.conds(1, (2,))
    adapter.setup(p, make_params(enabled=True), report)
    step(kind, p, F.latent(1), cond, uncond, scale=1.0)
    assert report.applied == 0 and report.fallbacks == {"CFG scale ≤ 1 (no guidance to redistribute)": 1}
    if kind == "reforge":  # NGMS: the modifiers see the uncond, sampling_function gets None
        unet = p.sd_model.forge_objects.unet
        options = unet.model_options
        x = F.latent(1)
        options["conditioning_modifiers"][0](unet.model, x, None, uncond, cond, 7.0, options, 0)
        reforge_sampling(unet, x, torch.ones(1), cond, None, 1.0, modifiers=False)
        assert report.fallbacks["no unconditional pass (NGMS / skip early CFG)"] == 1 and not report.warned


def test_unsupported_without_ldm_patched_unet(host):
    _, adapter = host
    p = F.make_p()
    assert adapter.unsupported_reason(p) is None
    linear = types.SimpleNamespace(diffusion_model=torch.nn.Linear(1, 1))
    p.sd_model.forge_objects.unet = F.UnetPatcher(linear)
    assert "not Forge's UNet" in adapter.unsupported_reason(p)

"""End-to-end: S-CFG in a running WebUI Forge, through its HTTP API, judged by its effects.

Set SCFG_FORGE_URL (e.g. http://127.0.0.1:7862) to a Forge started with --api, this extension
installed and an SD1.x or SDXL checkpoint loaded (random weights are fine: tests/e2e/models.py --kind sd15
--full-te-vae --unet forge-sd15-small, or --kind sdxl --sdxl-full-te-vae --unet forge-sdxl-small).
Everything is 64x64 with 4 Euler steps and a fixed seed, so the suite runs in minutes on 2 CPU cores.
Each case compares images pixel by pixel with S-CFG on, off, and with its rate forced to 1
(min_rate = max_rate = 1, which must give plain CFG bit for bit), and reads GET /scfg/v1/status.
ControlNet and LoRA cases run when models/ControlNet holds ``<checkpoint>-controlnet`` / models/Lora
``<checkpoint>-lora`` for the loaded checkpoint (tests/e2e/models.py --kind controlnet|lora
--unet forge-sd15-small); reference_only needs only the built-in ControlNet. test_prediction_types runs
on the checkpoints named *-sd2, *-sd2-v, *-sdxl-v, *-sdxl-v-ztsnr (tests/e2e/models.py --kind sd2
--full-te-vae --unet forge-sd2-small / --kind sdxl --sdxl-full-te-vae --unet forge-sdxl-small, with
--prediction, --ztsnr).
"""

import base64
import io
import json
import os
import re
import threading
import time

import numpy as np
import pytest

from scfg_ext.params import FIELDS, infotext_key
from tests.e2e.client import api_call, hires_modules
from tests.e2e.client import decode_png as _png

URL = os.environ.get("SCFG_FORGE_URL", "").rstrip("/")
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not URL, reason="SCFG_FORGE_URL is not set: the Forge end-to-end suite needs a "
                                       "running Forge (--api) with this extension and an SD1.x/SDXL model"),
]

BASE = dict(prompt="a red apple on a wooden table, a cat", negative_prompt="blurry, ugly", seed=1234,
            steps=4, width=64, height=64, cfg_scale=7.0, sampler_name="Euler", scheduler="Automatic",
            batch_size=1, n_iter=1, save_images=False, send_images=True)
PLAIN_CFG = "CFG scale ≤ 1 (no guidance to redistribute)"
RATE_ONE = dict(min_rate=1.0, max_rate=1.0)
DYNTHRES = "DynamicThresholding (CFG-Fix) Integrated"
PAG = "PerturbedAttentionGuidance Integrated"


def call(path, body=None, timeout=900):
    return api_call(URL, path, body, timeout)


def status():
    code, body = call("/scfg/v1/status")
    assert code == 200, body
    return body


def scfg(**values):
    """alwayson_scripts entry: positional args in FIELDS order (S-CFG enabled unless told)."""
    values.setdefault("enabled", True)
    return {"S-CFG": {"args": [values.get(f.name, f.default) for f in FIELDS]}}


class Result:
    def __init__(self, body, report):
        self.images = [np.asarray(_png(b), dtype=np.int16) for b in body["images"]]
        self.info = json.loads(body["info"])
        self.infotext = self.info["infotexts"][0]
        self.report = report

    @property
    def image(self):
        return self.images[0]


def generate(scripts=None, endpoint="txt2img", **overrides):
    body = {**BASE, **overrides, "alwayson_scripts": {k: v for s in (scripts or []) for k, v in s.items()}}
    code, answer = call(f"/sdapi/v1/{endpoint}", body)
    assert code == 200, answer
    return Result(answer, status()["last_run"])


def same(a, b):
    return a.shape == b.shape and np.array_equal(a, b)


def differs(a, b, at_least=None):
    """Mean absolute pixel difference above ``at_least`` (of 255): random-weight models guide weakly.

    The default is 0.1, and 0.02 on Forge Classic: it runs the first (the most guided) of the 4 steps
    at CFG 1 with its default settings, and S-CFG's effect there measured 0.03 to 0.05 in the AND,
    separate-passes and ControlNet cases (0.2 to 2 on the other hosts)."""
    if at_least is None:
        at_least = 0.02 if early_plain_steps() else 0.1
    return a.shape != b.shape or float(np.abs(a - b).mean()) > at_least


NO_UNCOND = "no unconditional pass (NGMS / skip early CFG)"
HOST = {}  # "host" (adapter family) and "host_name" (the WebUI) of the running host


def early_plain_steps() -> int:
    """Steps the host itself runs at CFG 1 with default settings: Forge Classic's skip-early test
    `0 <= step/total <= skip_early_cond` holds at step 0 with its default 0."""
    return 1 if HOST.get("host_name") == "Forge Classic" else 0


def applied(result, steps):
    """All ``steps`` applied, less the steps the host itself runs without guidance (plain CFG)."""
    early = early_plain_steps()
    assert result.report["steps_applied"] == steps - early, result.report
    assert result.report["steps_fallback"].get(PLAIN_CFG, 0) <= early, result.report
    assert not {r: n for r, n in result.report["steps_fallback"].items() if r != PLAIN_CFG}, result.report


def require_scripts(*titles):
    """Skip unless the host has these scripts (Forge's built-ins differ between the forks)."""
    names = {t.lower() for t in call("/sdapi/v1/scripts")[1]["txt2img"]}
    missing = [t for t in titles if t.lower() not in names]
    if missing:
        pytest.skip(f"{HOST.get('host_name')} has no {missing} script")


def hires_settings() -> dict:
    return hires_modules(HIRES, HOST.get("host"))


@pytest.fixture(scope="module", autouse=True)
def forge():
    try:
        body = status()
    except OSError as error:  # urllib.error.URLError included
        pytest.fail(f"no S-CFG status route at {URL}: {error}")
    assert body["host"] in ("forge", "ldm_patched"), body
    assert body["hooks_installed"] == []
    HOST.update(host=body["host"], host_name=body.get("host_name", body["host"]))


def test_status_route():
    body = status()
    assert set(body) >= {"version", "host", "host_name", "hooks_installed", "last_run", "last_error"}
    assert body["host"] in ("forge", "ldm_patched") and body["hooks_installed"] == []


def test_scfg_changes_the_image_and_rate_one_is_plain_cfg():
    plain = generate()
    on = generate([scfg()])
    one = generate([scfg(**RATE_ONE)])
    assert differs(on.image, plain.image)
    applied(on, 4)
    assert on.report["rate"]["min"] < on.report["rate"]["max"]
    assert same(one.image, plain.image)
    applied(one, 4)
    assert status()["hooks_installed"] == []
    again = generate()  # S-CFG off again: nothing of the previous runs is left in the model
    assert same(again.image, plain.image)


def test_infotext_holds_every_parameter():
    result = generate([scfg(strength=1.5, preset="paper", refine_power=3, min_rate=0.7, levels="4,8")])
    keys = [infotext_key(f) for f in FIELDS]
    assert all(f"{k}: " in result.infotext for k in keys), result.infotext
    assert "S-CFG strength: 1.5" in result.infotext and 'S-CFG levels: "4,8"' in result.infotext
    assert "S-CFG preset: paper" in result.infotext
    applied(result, 4)


def test_batch_of_two_different_prompts_has_per_image_masks():
    """Prompt matrix puts "apple" and "apple, cat" in one batch of 2 with the same seed."""
    matrix = dict(script_name="prompt matrix", script_args=[False, False, "positive", "comma", 0])
    both = generate([scfg()], prompt="a red apple|a cat", batch_size=2, **matrix)
    first = generate([scfg()], prompt="a red apple")
    second = generate([scfg()], prompt="a red apple, a cat")
    applied(both, 4)
    images = both.images[-2:]  # the grid comes first
    assert np.abs(images[0] - first.image).max() <= 2
    assert np.abs(images[1] - second.image).max() <= 2
    assert differs(images[0], images[1])


def test_and_prompt():
    prompt = "a red apple :0.9 AND a cat :0.3"
    plain, on, one = generate(prompt=prompt), generate([scfg()], prompt=prompt), \
        generate([scfg(**RATE_ONE)], prompt=prompt)
    applied(on, 4)
    assert differs(on.image, plain.image) and same(one.image, plain.image)
    swapped = generate([scfg()], prompt="a cat :0.3 AND a red apple :0.9")  # each keeps its weight
    assert np.abs(swapped.image - on.image).max() <= 2


def test_previews_of_the_maps():
    result = generate([{"S-CFG": {"args": [{"enabled": True, "show_maps": True, "api_previews": True}]}}],
                      prompt="a red apple AND a cat")
    applied(result, 4)
    assert len(result.images) == 2 and result.images[1].shape[1] > 64  # the image, then its preview
    assert "S-CFG preview" in result.info["infotexts"][1]


def test_regions_over_the_image():
    result = generate([{"S-CFG": {"args": [{"enabled": True, "overlay": True, "api_previews": True}]}}],
                      prompt="a red apple on a wooden table")
    applied(result, 4)
    assert len(result.images) == 2 and result.images[1].shape == result.images[0].shape
    assert result.info["infotexts"][1].startswith("S-CFG regions over image 1")
    assert np.abs(result.images[1].astype(int) - result.images[0].astype(int)).max() > 0


def test_long_prompt_with_break():
    prompt = ("a red apple on a wooden table, " * 12) + "BREAK a cat sitting next to it"  # 3 chunks
    plain, on, one = generate(prompt=prompt), generate([scfg()], prompt=prompt), \
        generate([scfg(**RATE_ONE)], prompt=prompt)
    applied(on, 4)
    assert differs(on.image, plain.image) and same(one.image, plain.image)


def test_separate_cond_and_uncond_unet_calls():
    """5 prompt chunks against 1 cannot be tiled (ratio > 4): Forge runs cond and uncond apart."""
    prompt = " BREAK ".join(["a red apple", "a wooden table", "a cat", "sunlight", "a window"])
    plain, on, one = generate(prompt=prompt), generate([scfg()], prompt=prompt), \
        generate([scfg(**RATE_ONE)], prompt=prompt)
    applied(on, 4)
    assert differs(on.image, plain.image) and same(one.image, plain.image)


def test_empty_negative_prompt():
    """SDXL zeroes an empty negative prompt's context: uniform uncond attention, foreground from cond."""
    plain, on, one = generate(negative_prompt=""), generate([scfg()], negative_prompt=""), \
        generate([scfg(**RATE_ONE)], negative_prompt="")
    applied(on, 4)
    assert on.report["rate"]["min"] < on.report["rate"]["max"]  # not a uniform 0.8 (empty foreground)
    assert differs(on.image, plain.image) and same(one.image, plain.image)


def test_cfg_one_is_plain():
    plain, on = generate(cfg_scale=1.0), generate([scfg()], cfg_scale=1.0)
    assert same(on.image, plain.image)
    assert on.report["steps_applied"] == 0 and on.report["steps_fallback"] == {PLAIN_CFG: 4}


def test_skip_early_cfg():
    settings = dict(override_settings={"skip_early_cond": 0.3}, steps=6)  # steps 0 and 1 at CFG 1
    try:
        plain, on, one = generate(**settings), generate([scfg()], **settings), \
            generate([scfg(**RATE_ONE)], **settings)
    finally:  # the WebUI does not restore an option that was still at its default
        assert call("/sdapi/v1/options", {"skip_early_cond": 0.0})[0] == 200
    if HOST["host_name"] != "Forge Classic":  # Classic records no such infotext key
        assert "Skip Early CFG" in on.infotext
    fallbacks = on.report["steps_fallback"]  # reForge drops the uncond, the others set CFG 1
    assert on.report["steps_applied"] == 4 and sum(fallbacks.values()) == 2, on.report
    assert set(fallbacks) <= {PLAIN_CFG, NO_UNCOND}, on.report
    assert not same(on.image, plain.image) and same(one.image, plain.image)


@pytest.mark.parametrize("size", [(64, 96), (72, 56)])
def test_non_square_and_odd_sizes(size):
    width, height = size
    plain, on, one = generate(width=width, height=height), generate([scfg()], width=width, height=height), \
        generate([scfg(**RATE_ONE)], width=width, height=height)
    assert on.image.shape == (height, width, 3)
    applied(on, 4)
    assert differs(on.image, plain.image) and same(one.image, plain.image)


HIRES = dict(enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", hr_second_pass_steps=2,
             denoising_strength=0.6, hr_cfg=7.0)  # (Forge's API default hires CFG is 1)


def test_hires_fix():
    plain = generate(**hires_settings())
    on = generate([scfg()], **hires_settings())
    off = generate([scfg(hires="off")], **hires_settings())
    own = generate([scfg(hires="own", hires_min_rate=1.0, hires_max_rate=1.0)], **hires_settings())
    assert on.image.shape == (96, 96, 3)
    assert off.report["steps_applied"] == 4 - early_plain_steps()
    assert on.report["steps_applied"] > off.report["steps_applied"]  # and the hires pass
    assert differs(on.image, plain.image) and differs(off.image, plain.image)
    assert own.report["rate"]["max"] > 1.0  # first pass acted; hires pass had rate 1
    assert "S-CFG hires: off" in off.infotext and status()["hooks_installed"] == []


def _png_b64(image):
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image.astype(np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize("inpaint", [False, True])
def test_img2img_and_inpaint(inpaint):
    init = _png_b64(generate().image)
    extra = dict(init_images=[init], denoising_strength=0.75)
    if inpaint:
        mask = np.zeros((64, 64, 3), np.uint8)
        mask[16:48, 16:48] = 255
        extra.update(mask=_png_b64(mask), inpainting_fill=1, inpaint_full_res=False, mask_blur=0)
    plain = generate(endpoint="img2img", **extra)
    on = generate([scfg()], endpoint="img2img", **extra)
    one = generate([scfg(**RATE_ONE)], endpoint="img2img", **extra)
    applied(on, 4)
    applied(one, 4)
    assert differs(on.image, plain.image)
    if not inpaint:  # Forge re-noises the masked latent with the unseeded global RNG every step,
        assert same(one.image, plain.image)  # so two plain inpaint runs differ already


def test_dynamic_thresholding_pag_and_scfg_all_act():
    """S-CFG chains DynThres's cfg function and leaves PAG's per-pass ("middle", 0) patch in force.

    128x128 so that PAG's middle-block self-attention has more than one token to perturb.
    """
    require_scripts(DYNTHRES, PAG)
    dyn = {DYNTHRES: {"args": [True, 7.0, 1.0, "Constant", 0.0, "Constant", 0.0, 1.0, "enable", "MEAN",
                               "AD", 1.0]}}
    pag = {PAG: {"args": [True, 30.0, 0.0, 0.0, 1.0]}}
    settings = dict(cfg_scale=15.0, width=128, height=128)
    everything = generate([scfg(), dyn, pag], **settings)
    applied(everything, 4)
    assert "dynthres_enabled: True" in everything.infotext and "pagi_enabled: True" in everything.infotext
    for without in ([dyn, pag], [scfg(), pag], [scfg(), dyn]):  # leave out each one in turn
        assert differs(generate(without, **settings).image, everything.image, 0.05), without
    chained_one = generate([scfg(**RATE_ONE), dyn, pag], **settings)
    assert same(chained_one.image, generate([dyn, pag], **settings).image)


def test_refiner_switch_is_followed():
    """apply_refiner reloads another model mid-pass: its UNet gets S-CFG's patches too."""
    current = call("/sdapi/v1/options")[1]["sd_model_checkpoint"] or ""

    def name(title):  # "x.safetensors [hash]" or "x.safetensors" -> "x.safetensors"
        return os.path.basename(title.split(" [")[0])

    others = [m["title"] for m in call("/sdapi/v1/sd-models")[1]
              if name(m["title"]) != name(current) and not prediction_suffix(m["model_name"])]
    family = "sdxl" if "sdxl" in current else "sd15"  # a refiner of the same family where there is one
    others.sort(key=lambda title: family not in name(title))  # (Neo and Classic detect no tiny SDXL)
    if not current:
        pytest.skip("the WebUI does not report the loaded checkpoint (sd_model_checkpoint is null)")
    if not others:
        pytest.skip("a refiner switch needs a second checkpoint")
    refiner = dict(refiner_checkpoint=others[0], refiner_switch_at=0.5)
    plain, on = generate(**refiner), generate([scfg()], **refiner)
    assert "Refiner: " in on.infotext, on.infotext
    applied(on, 4)  # before: the refiner's two steps ran unpatched, counted nowhere
    assert differs(on.image, plain.image)
    assert status()["hooks_installed"] == []
    call("/sdapi/v1/options", {"sd_model_checkpoint": current})


def _scfg_sets_up_first() -> bool:
    """Whether the WebUI runs S-CFG's process_before_every_sampling before the built-ins' (the
    user-set callback priority; it needs a restart, so the case runs only on such a WebUI)."""
    order = call("/sdapi/v1/options")[1].get("prioritized_callbacks_script_process_before_every_sampling")
    return bool(order) and "scfg_guidance.py" in order[0]


def test_dynamic_thresholding_set_up_after_scfg_gives_plain_cfg_and_a_warning():
    """DynThres's cfg function installed after S-CFG's setup: S-CFG must not add its correction
    on top of the clamp (nor be replaced silently): plain CFG with one warning."""
    require_scripts(DYNTHRES)
    if not _scfg_sets_up_first():
        pytest.skip("start Forge with Settings > Callbacks > script_process_before_every_sampling "
                    "callback priority set to S-CFG's script first (restart needed)")
    dyn = {DYNTHRES: {"args": [True, 7.0, 1.0, "Constant", 0.0, "Constant", 0.0, 1.0, "enable", "MEAN",
                               "AD", 1.0]}}
    settings = dict(cfg_scale=15.0)
    both, alone = generate([scfg(), dyn], **settings), generate([dyn], **settings)
    assert same(both.image, alone.image)
    assert both.report["steps_applied"] == 0
    assert "changed the CFG function after S-CFG's setup" in both.infotext, both.infotext


def test_interrupt_leaves_nothing_installed():
    plain = generate()
    done = {}

    def run():
        done["result"] = call("/sdapi/v1/txt2img", {**BASE, "steps": 200, "alwayson_scripts": scfg()})

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.time() + 300
    while time.time() < deadline and not (status()["hooks_installed"]
                                          and call("/sdapi/v1/progress")[1]["state"]["sampling_step"] >= 2):
        time.sleep(0.5)
    assert status()["hooks_installed"], "S-CFG hooks should be installed while sampling"
    call("/sdapi/v1/interrupt", {})
    worker.join(600)
    assert done["result"][0] == 200
    report = status()
    assert report["hooks_installed"] == [] and 2 <= report["last_run"]["steps_applied"] < 200
    assert same(generate().image, plain.image)


@pytest.mark.parametrize("fault", ["cross_attention", "result", "oom"])
def test_injected_fault_gives_plain_cfg_and_one_warning(fault):
    plain = generate()
    faulty = generate([{"S-CFG": {"args": [{"enabled": True, "test_fault": fault}]}}])
    assert "S-CFG error" not in faulty.infotext, faulty.infotext
    assert same(faulty.image, plain.image)
    assert faulty.report["steps_applied"] == 0 and sum(faulty.report["steps_fallback"].values()) == 4
    faults = {r: n for r, n in faulty.report["steps_fallback"].items() if r != PLAIN_CFG}
    assert len(faults) == 1 and "injected test fault" in faulty.infotext
    assert status()["hooks_installed"] == []


def test_faults_in_setup_teardown_and_preview_finish_the_image():
    """setup: plain CFG; teardown: the S-CFG image, restored; preview: the images without it. Each
    with one warning, nothing installed afterwards, and the next run clean."""
    plain, on = generate(), generate([scfg()])
    runs = {fault: generate([{"S-CFG": {"args": [{"enabled": True, "test_fault": fault, "show_maps": True,
                                                   "api_previews": True}]}}])
            for fault in ("setup", "teardown", "preview")}
    assert same(runs["setup"].image, plain.image) and runs["setup"].report["steps_applied"] == 0
    assert same(runs["teardown"].image, on.image) and same(runs["preview"].image, on.image)
    assert len(runs["preview"].images) == 1 and len(runs["teardown"].images) == 2
    for fault, result in runs.items():
        said = " ".join([result.infotext, *result.report["notes"], *result.report["steps_fallback"]])
        assert f"injected test fault in {fault}" in said, (fault, result.report)
    assert status()["hooks_installed"] == []
    assert same(generate([scfg()]).image, on.image)


# ----------------------------------------------------------------------------- ControlNet and LoRA

def _checkpoint():
    """The loaded checkpoint's name without extension and hash, e.g. "scfg-sd15-small"."""
    title = call("/sdapi/v1/options")[1]["sd_model_checkpoint"] or ""
    return os.path.splitext(os.path.basename(title.split(" [")[0]))[0]


def _gradient(flip=False):
    """A 64x64 RGB gradient (red across, green down): the control image of preprocessor None."""
    image = np.zeros((64, 64, 3), np.int16)
    image[..., 0], image[..., 1], image[..., 2] = np.arange(64)[None] * 4, np.arange(64)[:, None] * 4, 128
    return _png_b64(image[::-1, ::-1] if flip else image)


def _unit(model="None", module="None", flip=False, **extra):
    unit = {"enabled": True, "module": module, "model": model, "image": _gradient(flip), "weight": 1.0,
            "resize_mode": "Just Resize", "processor_res": 64, "pixel_perfect": False,
            "control_mode": "Balanced", **extra}
    return {"ControlNet": {"args": [unit]}}


def _control_model():
    """The ``<checkpoint>-controlnet`` model of the loaded checkpoint (tests/e2e/models.py --kind controlnet
    --unet forge-sd15-small for a checkpoint written with that UNet), by its full "name [hash]"."""
    code, body = call("/controlnet/model_list")
    if code != 200:
        pytest.skip("Forge's ControlNet (sd_forge_controlnet) does not answer /controlnet/model_list")
    wanted = _checkpoint() + "-controlnet"
    for model in body["model_list"]:
        if model.split(" [")[0] == wanted:
            return model
    pytest.skip(f"no control model {wanted!r} in models/ControlNet for the loaded checkpoint "
                "(python -m tests.e2e.models --kind controlnet --unet forge-sd15-small --name ...)")


def _check_with(extra, what):
    """``extra`` (ControlNet unit or LoRA prompt) acts; with it S-CFG acts and rate 1 is plain CFG."""
    scripts, overrides = extra
    without = generate(**{k: v for k, v in overrides.items() if k != "prompt"})
    plain = generate(scripts, **overrides)
    assert differs(plain.image, without.image), f"the {what} had no effect"
    on = generate([*scripts, scfg()], **overrides)
    one = generate([*scripts, scfg(**RATE_ONE)], **overrides)
    applied(on, 4)  # no fallback but the host's own plain-CFG steps
    applied(one, 4)
    assert differs(on.image, plain.image), f"S-CFG had no effect with the {what}"
    assert same(one.image, plain.image), f"rate 1 must be plain CFG with the same {what}"
    assert status()["hooks_installed"] == []
    return plain, on


@pytest.mark.parametrize("mode", ["Balanced", "ControlNet is more important"])
def test_controlnet(mode):
    """Control residuals in the UNet ("more important": cond rows only; u vs c includes the control)."""
    model = _control_model()
    plain, on = _check_with(([_unit(model, control_mode=mode)], {}), "ControlNet unit")
    assert "ControlNet 0" in on.infotext and "S-CFG" in on.infotext
    flipped = generate([_unit(model, control_mode=mode, flip=True)])
    assert differs(flipped.image, plain.image), "the control image did not reach the model"


def test_controlnet_reference_only():
    """reference_only records the reference in a nested cond/uncond pass of its conditioning modifier
    and replaces every attn1; S-CFG must capture the real pass of every step, not the nested one."""
    if call("/controlnet/model_list")[0] != 200:
        pytest.skip("Forge's ControlNet (sd_forge_controlnet) is not available")
    _check_with(([_unit(module="reference_only", threshold_a=0.5)], {}), "reference_only unit")


def test_lora():
    """A LoRA (merged into the UNet weights by Forge) on the cross-attention of every transformer."""
    wanted = _checkpoint() + "-lora"
    names = [entry["name"] for entry in call("/sdapi/v1/loras")[1] or []]
    if wanted not in names:
        pytest.skip(f"no LoRA {wanted!r} in models/Lora for the loaded checkpoint "
                    "(python -m tests.e2e.models --kind lora --unet forge-sd15-small --name ...)")
    _check_with(([], {"prompt": f"{BASE['prompt']} <lora:{wanted}:1>"}), "LoRA")


def test_hooks_are_removed_when_sampling_raises():
    """An unknown hires sampler raises after the first pass has sampled with our patches installed."""
    hires = hires_modules({"enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Latent",
                           "hr_sampler_name": "no such sampler"}, HOST["host"], modules=())
    code, body = call("/sdapi/v1/txt2img", {**BASE, **hires, "alwayson_scripts": scfg()})
    assert code >= 400, body
    report = status()
    assert report["last_run"]["steps_applied"] == 4 - early_plain_steps(), report
    assert report["hooks_installed"] == [], "the patches outlived a generation that raised"


# ----------------------------------------------------------------------------- SD2.x and v-prediction

# checkpoint name suffix (tests/e2e/models.py --kind sd2|sdxl [--prediction v] [--ztsnr] names) ->
# (family, prediction, zero terminal SNR)
PREDICTION_CASES = {"sd2": ("sd2", "eps", False), "sd2-v": ("sd2", "v", False),
                    "sdxl-v": ("sdxl", "v", False), "sdxl-v-ztsnr": ("sdxl", "v", True)}
SD2_TEXT_KEY = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"
V_MARKER_KEY = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"


def prediction_suffix(model_name):
    """The PREDICTION_CASES key a checkpoint name ends with ("scfg-x-sd2-v" -> "sd2-v"), or None."""
    longest_first = sorted(PREDICTION_CASES, key=len, reverse=True)
    return next((k for k in longest_first if model_name.endswith("-" + k)), None)


def prediction_checkpoint(suffix):
    for model in call("/sdapi/v1/sd-models")[1]:
        if prediction_suffix(model["model_name"]) == suffix:
            return model
    kind, prediction, ztsnr = PREDICTION_CASES[suffix]
    size = "--full-te-vae --unet forge-sd2-small" if kind == "sd2" else \
        "--sdxl-full-te-vae --unet forge-sdxl-small"
    pytest.skip(f"no checkpoint named *-{suffix} in the WebUI (python -m tests.e2e.models --kind {kind} "
                f"{size} --prediction {prediction}{' --ztsnr' if ztsnr else ''})")


def forge_reads(model):
    """(family, prediction by the yaml, prediction by the weights, ztsnr) as Forge's loader reads the file.

    backend/loader.py forge_loader: a yaml beside the checkpoint with model.params.parameterization "v" or a
    denoiser scaling_config target ending in ".VScaling" sets v_prediction; otherwise huggingface_guess's
    estimate (model_list.py): SD20 is v when std(output_blocks.11.1.transformer_blocks.0.norm1.bias) > 0.09,
    SDXL when the state dict has a ``v_pred`` key; ``ztsnr`` in the state dict sets guess.ztsnr. Both must
    name the intended type: the yaml wins where it says v, and the ldm_patched forks read only the weights.
    """
    from safetensors import safe_open

    path = model["filename"]
    if not os.path.isfile(path):
        pytest.skip(f"S-CFG checks passed; {path} is not readable from here to confirm the prediction type")
    config = os.path.splitext(path)[0] + ".yaml"
    text = open(config, encoding="utf-8").read() if os.path.isfile(config) else ""
    by_yaml = "v" if (re.search(r"^\s*parameterization:\s*[\"']?v[\"']?\s*$", text, re.M)
                      or re.search(r"target:\s*\S+\.VScaling\s*$", text, re.M)) else "eps"
    with safe_open(path, "pt") as fh:
        keys = set(fh.keys())
        family = "sd2" if SD2_TEXT_KEY in keys else "sdxl"
        if family == "sd2":
            marker = fh.get_tensor(V_MARKER_KEY).float()
            v = float(marker.std(unbiased=False)) > 0.09
        else:
            v = "v_pred" in keys
    return family, by_yaml, "v" if v else "eps", "ztsnr" in keys


@pytest.mark.parametrize("suffix", list(PREDICTION_CASES))
def test_prediction_types(suffix):
    """SD2 eps / SD2 v / SDXL v (+ zero terminal SNR): S-CFG changes the image on every step, rate 1 is plain
    CFG bit for bit, no hook left, on the checkpoint asked for, whose files name the intended type to every
    reader; the ztsnr model's infotext shows the schedule Forge applied (processing.py:985)."""
    family, prediction, ztsnr = PREDICTION_CASES[suffix]
    model = prediction_checkpoint(suffix)
    override = {"sd_model_checkpoint": model["title"]}  # restored after each request
    if family == "sdxl":  # the SDXL "Approx NN" preview model would be downloaded at the first step
        override["show_progress_type"] = "Approx cheap"
    before = call("/sdapi/v1/options")[1]["show_progress_type"]
    try:
        settings = dict(override_settings=override)
        plain, on = generate(**settings), generate([scfg()], **settings)
        one = generate([scfg(**RATE_ONE)], **settings)
        if family == "sd2":  # the previews label regions with the SD2 tokenizer's pieces
            named = {"enabled": True, "overlay": True, "show_maps": True, "api_previews": True}
            shown = generate([{"S-CFG": {"args": [named]}}], **settings)
            assert len(shown.images) == 3 and same(shown.images[0], on.image), shown.info["infotexts"]
            assert shown.info["infotexts"][1].startswith("S-CFG regions over image 1")
            assert shown.info["infotexts"][2].startswith("S-CFG preview of image 1")
    finally:  # the WebUI does not restore an option that was still at its default
        if call("/sdapi/v1/options")[1]["show_progress_type"] != before:
            call("/sdapi/v1/options", {"show_progress_type": before})
    # reForge applies the ztsnr key's schedule too (forge_loader.py) but names it in the infotext only
    # when the sd_noise_schedule option is set (sd_models.py): there the twin without the key tells
    writes_schedule = "reforge" not in HOST.get("host_name", "").lower()
    for result in (plain, on, one):
        assert f"Model: {model['model_name']}," in result.infotext, result.infotext
        if writes_schedule or not ztsnr:
            assert ("Noise Schedule: " in result.infotext) == ztsnr, result.infotext
    if ztsnr:  # the same weights without the ztsnr key give another image: the schedule was applied
        twin = prediction_checkpoint("sdxl-v")
        twin_plain = generate(override_settings={**override, "sd_model_checkpoint": twin["title"]})
        assert differs(plain.image, twin_plain.image), "the ztsnr key changed nothing"
    applied(on, 4)
    applied(one, 4)
    assert on.report["rate"]["min"] < on.report["rate"]["max"], on.report
    assert differs(on.image, plain.image), "S-CFG had no effect"
    assert same(one.image, plain.image), "rate 1 must be plain CFG"
    assert status()["hooks_installed"] == [] and status()["last_error"] is None
    assert forge_reads(model) == (family, prediction, prediction, ztsnr)

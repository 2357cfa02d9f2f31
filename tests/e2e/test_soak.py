"""End-to-end soak: hundreds of generations in a seeded random mix against a running WebUI.

Opt-in: set SCFG_SOAK to the number of generations (250 where the WebUI has an SDXL checkpoint:
see PHASE) and SCFG_A1111_URL and/or SCFG_FORGE_URL; skipped with the reason otherwise.
SCFG_SOAK_SEED picks the mix (default 1). It runs on the SD1.x checkpoint (*sd15), switching to it
first if another is loaded.

    SCFG_SOAK=250 SCFG_A1111_URL=http://127.0.0.1:7861 python -m pytest -q -s tests/e2e/test_soak.py

The mix: S-CFG on/off, presets and other parameters, batch 1-4, AND, long prompts with BREAK, hires
fix, img2img and inpaint, one img2img request of 50 images (10 init images, batch 10 x 5 iterations
on one ``p``), an X/Y/Z grid over two S-CFG axes, a checkpoint switch SD1.x <-> SDXL every ~50
generations (when the WebUI has an SDXL checkpoint), interrupts at random moments, generations that
raise inside the host (an unknown hires sampler) and injected S-CFG faults. After each generation:
no hook installed, the number of images, and every ~20 generations a plain-CFG request at a fixed
seed against its first image on that checkpoint; the server's RSS (VmRSS, from /proc) is sampled on
the SD1.x checkpoint. Prints generations done, failures by kind, RSS at start / after warm-up / at
end (growth per 100 generations after warm-up), hooks left and reference mismatches, and asserts the
goals: no failure, no hook left, no mismatch, RSS growth under 50 MiB per 100 generations.
"""

import base64
import io
import json
import os
import random
import threading
import time
import urllib.parse
from collections import Counter

import pytest

from bench.webui import pid_for_port, vmrss_kib
from scfg_ext.segment import PRESETS, REGIONS
from tests.e2e.client import api_call, hires_modules
from tests.e2e.test_xyz import axis_index, xyz_args

HOSTS = {"a1111": os.environ.get("SCFG_A1111_URL", "").rstrip("/"),
         "forge": os.environ.get("SCFG_FORGE_URL", "").rstrip("/")}
GENERATIONS = int(os.environ.get("SCFG_SOAK", "0") or 0)
SEED = int(os.environ.get("SCFG_SOAK_SEED", "1"))
RSS_GROWTH_LIMIT_MIB = 50.0  # per 100 generations after warm-up
# RSS is compared in like states. With an SDXL checkpoint the soak switches every PHASE generations,
# so "warm" is the end of the SD1.x phase after the first SD1.x -> SDXL -> SD1.x round trip
# (generation 150) and "end" the end of the last SD1.x phase: with SCFG_SOAK=250 both lie 50
# generations after a switch back. Without one, "warm" is after WARMUP generations.
PHASE = 50
WARM_PHASE_END = 3 * PHASE
WARMUP = 60

BASE = dict(prompt="a red apple on a wooden table, a cat", negative_prompt="blurry", seed=1234, steps=4,
            width=64, height=64, cfg_scale=7.0, sampler_name="Euler", batch_size=1, n_iter=1,
            save_images=False, send_images=True)
PROMPTS = ["a red apple on a wooden table, a cat", "a blue house under a green tree",
           "a dog AND a yellow ball :0.6", "a castle on a hill BREAK a dragon in the sky",
           ", ".join(["a small red bird on a branch in the morning light"] * 9)]
FAULTS = ("cross_attention", "result", "oom", "setup", "teardown", "preview")

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(GENERATIONS <= 0, reason="opt-in: set SCFG_SOAK to a number of generations "
                                                          "(e.g. 200) and SCFG_A1111_URL / SCFG_FORGE_URL")]


def png_b64(rng, size=64):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
    fill = tuple(rng.randrange(256) for _ in range(3))
    ImageDraw.Draw(image).ellipse((8, 8, size - 8, size - 8), fill=fill)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def mask_b64(size=64):
    from PIL import Image, ImageDraw

    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).rectangle((16, 16, 48, 48), fill=255)
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def scfg_args(rng) -> list:
    values = {"enabled": True, "preset": rng.choice(PRESETS),
              "refine_power": rng.randint(1, 4), "region": rng.choice(REGIONS),
              "strength": round(rng.uniform(0.5, 2.0), 2), "max_rate": round(rng.uniform(1.5, 4.0), 2)}
    if rng.random() < 0.2:
        values.update(start=0.25, end=0.75)
    if rng.random() < 0.1:
        values.update(show_maps=True, api_previews=True)
    return [values]


def expected_images(body, args) -> int | tuple[int, int]:
    """The images a request returns: one per image, plus with api_previews and show_maps one map
    panel per image and sub-prompt (AND)."""
    images = body["batch_size"] * body.get("n_iter", 1)
    named = args[0] if args and isinstance(args[0], dict) else {}
    if not (named.get("enabled") and named.get("api_previews") and named.get("show_maps")):
        return images
    return images + images, images + images * (1 + body["prompt"].count(" AND "))


def base_checkpoint(models: list[dict], loaded: str | None) -> str:
    """The SD1.x checkpoint the soak runs on and samples RSS on: the loaded one if it is a plain
    SD1.x model (another suite may have left SDXL, SD2 or a v-prediction model loaded), else the
    first *sd15 model."""
    def plain_sd1(model):
        return model["model_name"].endswith("sd15")
    titles = {m["title"]: m for m in models}
    if loaded in titles and plain_sd1(titles[loaded]):
        return loaded
    candidates = sorted(m["title"] for m in models if plain_sd1(m))
    if not candidates:
        pytest.skip(f"no SD1.x checkpoint (*sd15) among {sorted(titles)}")
    return candidates[0]


class Soak:
    def __init__(self, url):
        self.url, self.rng = url, random.Random(SEED)
        self.failures, self.kinds, self.hooks_left, self.mismatches = Counter(), Counter(), 0, 0
        self.references, self.rss, self.done, self.log = {}, {}, 0, []
        self.host = api_call(url, "/scfg/v1/status")[1]["host"]  # adapter family: a1111, forge, ldm_patched
        port = urllib.parse.urlparse(url).port
        self.pid = pid_for_port(port) if port else None
        models = api_call(url, "/sdapi/v1/sd-models")[1]
        loaded = api_call(url, "/sdapi/v1/options")[1].get("sd_model_checkpoint")
        self.base_model = base_checkpoint(models, loaded)
        xl = [m["title"] for m in models
              if m["model_name"].endswith("-sdxl") or m["model_name"] == "scfg-sdxl"]
        self.xl_model = xl[0] if xl else None
        self.model = loaded

    # -- bookkeeping
    def fail(self, kind, detail):
        self.failures[kind] += 1
        self.log.append(f"{self.done} {kind}: {str(detail)[:300]}")

    def after(self, kind, code, answer, images_expected):
        self.kinds[kind] += 1
        self.done += 1
        status = api_call(self.url, "/scfg/v1/status")[1]
        if status["hooks_installed"]:
            self.hooks_left += 1
            self.fail(kind, f"hooks left: {status['hooks_installed']}")
        if images_expected is None:
            return status
        low, high = images_expected if isinstance(images_expected, tuple) else (images_expected,) * 2
        got = len(answer.get("images", [])) if isinstance(answer, dict) else 0
        if code != 200:
            self.fail(kind, f"HTTP {code}: {json.dumps(answer)[:300]}")
        elif not low <= got <= high:
            self.fail(kind, f"{got} images, expected {low} to {high}")
        return status

    def sample_rss(self, label):
        if self.pid and self.model == self.base_model:
            with open(f"/proc/{self.pid}/status") as status:
                self.rss[label] = vmrss_kib(status.read()) / 1024

    def generate(self, endpoint, body):
        body = hires_modules(body, self.host)
        if self.model == self.xl_model:  # the default "Approx NN" live preview would download its SDXL model
            settings = {**body.get("override_settings", {}), "show_progress_type": "Approx cheap"}
            body["override_settings"] = settings
        return api_call(self.url, f"/sdapi/v1/{endpoint}", body, timeout=1800)

    # -- the kinds of generation
    def reference(self):
        code, answer = self.generate("txt2img", {**BASE, "seed": 777})
        self.after("reference", code, answer, 1)
        if code != 200:
            return
        first = self.references.setdefault(self.model, answer["images"][0])
        if answer["images"][0] != first:
            self.mismatches += 1
            self.fail("reference", f"plain CFG at seed 777 changed on {self.model}")

    def txt2img(self):
        rng = self.rng
        body = {**BASE, "seed": rng.randrange(10**6), "prompt": rng.choice(PROMPTS),
                "batch_size": rng.choice([1, 1, 2, 3, 4]), "width": rng.choice([64, 64, 96]),
                "height": rng.choice([64, 48, 64])}
        on = rng.random() < 0.75
        args = scfg_args(rng) if on else [False]
        kind = "scfg" if on else "plain"
        if rng.random() < 0.15:
            body.update(enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", hr_second_pass_steps=2,
                        denoising_strength=0.6, batch_size=1)
            kind += "+hires"
        body["alwayson_scripts"] = {"S-CFG": {"args": args}}
        code, answer = self.generate("txt2img", body)
        self.after(kind, code, answer, expected_images(body, args))

    def img2img(self, inpaint=False):
        rng = self.rng
        body = {**BASE, "seed": rng.randrange(10**6), "init_images": [png_b64(rng)],
                "denoising_strength": 0.6, "batch_size": rng.choice([1, 2])}
        if inpaint:
            body.update(mask=mask_b64(), inpainting_fill=1, inpaint_full_res=False)
        on = rng.random() < 0.75
        body["alwayson_scripts"] = {"S-CFG": {"args": scfg_args(rng) if on else [False]}}
        code, answer = self.generate("img2img", body)
        self.after("inpaint" if inpaint else "img2img", code, answer,
                   expected_images(body, body["alwayson_scripts"]["S-CFG"]["args"]))

    def img2img_batch(self):
        """50 images on one request: 10 init images, batch 10, 5 iterations on one p."""
        body = {**BASE, "init_images": [png_b64(self.rng) for _ in range(10)], "denoising_strength": 0.5,
                "batch_size": 10, "n_iter": 5, "alwayson_scripts": {"S-CFG": {"args": [True]}}}
        code, answer = self.generate("img2img", body)
        status = self.after("img2img batch", code, answer, 50)
        if code == 200 and status["last_run"]["steps_applied"] < 5 * 2:
            self.fail("img2img batch", f"S-CFG applied on {status['last_run']['steps_applied']} steps only")

    def xyz(self):
        x = axis_index(self.url, "[S-CFG] Max rate")
        y = axis_index(self.url, "[S-CFG] Strength")
        args = xyz_args(self.url, x, "1.5, 3")
        args[3], args[4] = y, "0.5, 1.5"
        body = {**BASE, "script_name": "x/y/z plot", "script_args": args,
                "alwayson_scripts": {"S-CFG": {"args": [True]}}}
        code, answer = self.generate("txt2img", body)
        self.after("xyz", code, answer, 1 + 4)

    def interrupt(self):
        result = {}
        body = {**BASE, "steps": 40, "seed": self.rng.randrange(10**6),
                "alwayson_scripts": {"S-CFG": {"args": scfg_args(self.rng)}}}
        worker = threading.Thread(target=lambda: result.update(answer=self.generate("txt2img", body)))
        worker.start()
        time.sleep(self.rng.uniform(0.05, 2.0))
        api_call(self.url, "/sdapi/v1/interrupt", {})
        worker.join(1800)
        code, answer = result.get("answer", (0, {}))
        self.after("interrupt", code, answer, 1)

    def host_raises(self):
        body = {**BASE, "enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Latent",
                "hr_sampler_name": "no such sampler", "alwayson_scripts": {"S-CFG": {"args": [True]}}}
        code, answer = self.generate("txt2img", body)
        self.after("host raises", code, answer, None)
        if code < 400:
            self.fail("host raises", f"expected an error from the host, got {code}")

    def fault(self):
        fault = self.rng.choice(FAULTS)
        values = {"enabled": True, "test_fault": fault}
        if fault == "preview":
            values.update(show_maps=True, api_previews=True)
        body = {**BASE, "seed": self.rng.randrange(10**6), "alwayson_scripts": {"S-CFG": {"args": [values]}}}
        code, answer = self.generate("txt2img", body)
        self.after(f"fault {fault}", code, answer, 1)

    def switch(self, target=None):
        if target is None and self.xl_model is None:
            return
        target = target or (self.xl_model if self.model == self.base_model else self.base_model)
        code, answer = api_call(self.url, "/sdapi/v1/options", {"sd_model_checkpoint": target}, timeout=1800)
        if code != 200:
            self.fail("switch", f"HTTP {code}: {answer}")
            return
        self.model = target

    def step(self):
        roll = self.rng.random()
        if roll < 0.45:
            self.txt2img()
        elif roll < 0.60:
            self.img2img()
        elif roll < 0.70:
            self.img2img(inpaint=True)
        elif roll < 0.78:
            self.fault()
        elif roll < 0.86:
            self.interrupt()
        elif roll < 0.90:
            self.host_raises()
        else:
            self.txt2img()

    def run(self, generations):
        """One action per generation, chosen by its index (so the mix is the same every run)."""
        if self.model != self.base_model:
            self.switch(self.base_model)
        self.sample_rss("start")
        specials = {generations // 3: self.img2img_batch, generations // 2: self.xyz}
        while self.done < generations:
            i = self.done
            if i in specials:
                specials.pop(i)()
            elif i and i % PHASE == 0:  # SD1.x <-> SDXL, then the reference on the new checkpoint
                if self.model == self.base_model and i >= WARM_PHASE_END and "warm" not in self.rss:
                    self.sample_rss("warm")  # the end of an SD1.x phase after a full round trip
                    self.rss["warm_at"] = self.done
                self.switch()
                self.reference()
            elif i % 20 == 0:
                self.reference()
            else:
                self.step()
            if self.done == WARMUP and self.xl_model is None:
                self.sample_rss("warm")
                self.rss["warm_at"] = self.done
        if self.model != self.base_model:
            self.switch()
        self.reference()
        self.sample_rss("end")

    def summary(self) -> dict:
        growth = None
        if "warm" in self.rss and "end" in self.rss and self.done > self.rss["warm_at"]:
            growth = (self.rss["end"] - self.rss["warm"]) * 100 / (self.done - self.rss["warm_at"])
        return {"generations": self.done, "kinds": {k: n for k, n in self.kinds.items() if "@" not in k},
                "failures": dict(self.failures), "hooks_left": self.hooks_left,
                "reference_mismatches": self.mismatches,
                "rss_mib": {k: round(v, 1) for k, v in self.rss.items() if k != "warm_at"},
                "rss_growth_mib_per_100": None if growth is None else round(growth, 1),
                "checkpoints": [self.base_model, self.xl_model], "log": self.log[:20]}


@pytest.mark.parametrize("host", list(HOSTS))
def test_soak(host):
    url = HOSTS[host]
    if not url:
        pytest.skip(f"SCFG_{host.upper()}_URL is not set")
    soak = Soak(url)
    started = time.time()
    try:
        soak.run(GENERATIONS)
    finally:
        summary = soak.summary()
        summary["minutes"] = round((time.time() - started) / 60, 1)
        print(f"\nS-CFG soak on {host} ({url}):\n{json.dumps(summary, indent=1)}")
        out = os.environ.get("SCFG_SOAK_OUT")
        if out:
            with open(out, "a") as file:
                file.write(json.dumps({"host": host, **summary}) + "\n")
    assert not summary["failures"] and summary["hooks_left"] == 0, summary
    assert summary["reference_mismatches"] == 0, summary
    if summary["rss_growth_mib_per_100"] is not None:
        assert summary["rss_growth_mib_per_100"] < RSS_GROWTH_LIMIT_MIB, summary

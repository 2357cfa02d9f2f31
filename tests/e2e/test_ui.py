"""The S-CFG accordion in a real WebUI page, in headless Chromium (Playwright).

Skipped unless SCFG_UI_URL (or SCFG_A1111_URL / SCFG_FORGE_URL) points at a running WebUI started
with its Gradio UI and this extension, and Playwright plus a Chromium (SCFG_CHROMIUM, default
/usr/bin/chromium) are installed. Enables S-CFG, generates, reads the infotext, then pastes an
infotext with non-default S-CFG values back and checks the controls follow.
"""

import json
import os
import re
import time
import urllib.request

import pytest

URL = os.environ.get("SCFG_UI_URL") or os.environ.get("SCFG_A1111_URL") or os.environ.get("SCFG_FORGE_URL")
CHROMIUM = os.environ.get("SCFG_CHROMIUM", "/usr/bin/chromium")

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(not URL, reason="set SCFG_UI_URL to a running WebUI with its UI and S-CFG"),
              pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"no Chromium at {CHROMIUM}")]

FLAGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-quic"]


@pytest.fixture(scope="module")
def page():
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 2200})
        page.set_default_timeout(120_000)
        page.goto(URL.rstrip("/") + "/")
        page.wait_for_selector("#txt2img_prompt textarea")
        yield page
        browser.close()


def open_accordion(page):
    """Open S-CFG's accordion by its label: once its checkbox has been clicked, the WebUIs'
    inputAccordion.js no longer opens the accordion when the box is ticked."""
    accordion = page.locator("#scfg_txt2img").first
    if "input-accordion-open" not in (accordion.get_attribute("class") or ""):
        page.locator("#scfg_txt2img .label-wrap").first.click()
    page.wait_for_selector("#scfg_strength_txt2img input[type=number]", state="visible")


def set_number(page, elem_id, value):
    if elem_id.startswith("scfg_"):
        open_accordion(page)
    box = page.locator(f"#{elem_id} input[type=number]").first
    box.fill(str(value))
    box.press("Enter")


def test_enable_generate_and_paste_back(page, tmp_path):
    page.locator("#txt2img_prompt textarea").fill("a red cube on a blue floor")
    for elem_id, value in (("txt2img_width", 64), ("txt2img_height", 64), ("txt2img_steps", 4)):
        set_number(page, elem_id, value)
    header = page.locator("#scfg_txt2img .input-accordion-checkbox").first
    if not header.is_checked():
        header.click()
    assert header.is_checked()
    page.locator("#txt2img_generate").click()
    info = page.locator("#html_info_txt2img").filter(has_text="S-CFG strength").first
    info.wait_for()
    text = info.inner_text()
    assert re.search(r"S-CFG: True", text), text
    for key in ("strength: 1.0", "preset: official", "min rate: 0.8", "max rate: 3.0"):
        assert f"S-CFG {key}" in text, text
    with urllib.request.urlopen(URL.rstrip("/") + "/scfg/v1/status", timeout=30) as response:
        status = json.load(response)
    assert status["last_run"]["steps_applied"] > 0 and status["hooks_installed"] == [], status
    page.screenshot(path=str(tmp_path / "generated.png"))

    # Paste an infotext with other S-CFG values back: the controls must follow it.
    header.click()  # switch S-CFG off first so the paste has to switch it on again
    assert not header.is_checked()
    pasted = ("a cat\nSteps: 4, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64, S-CFG: True, "
              "S-CFG strength: 1.5, S-CFG preset: paper, S-CFG max rate: 2.5")
    page.locator("#txt2img_prompt textarea").fill(pasted)
    page.locator("#txt2img_tools #paste, #txt2img_tools_group #paste, #paste").first.click()
    strength = "#scfg_strength_txt2img input[type=number]"
    page.wait_for_function(f"() => document.querySelector('{strength}').value == '1.5'")
    assert header.is_checked()
    assert page.locator("#scfg_max_rate_txt2img input[type=number]").first.input_value() == "2.5"
    assert page.locator("#scfg_preset_txt2img input[value=paper]").first.is_checked()


def test_a_garbled_paste_restores_defaults_and_keeps_the_rest(page):
    """A PNG's infotext whose S-CFG values are garbled: those controls get their defaults, the other
    S-CFG values and the WebUI's own fields (steps, seed) are pasted as usual, nothing breaks."""
    set_number(page, "scfg_strength_txt2img", 2)
    pasted = ("a garbled one\nSteps: 7, Sampler: Euler, CFG scale: 7, Seed: 4242, Size: 64x64, S-CFG: True, "
              "S-CFG strength: banana, S-CFG max rate: 2.5, S-CFG min rate: nan, S-CFG levels: <b>x</b>")
    page.locator("#txt2img_prompt textarea").fill(pasted)
    page.locator("#txt2img_tools #paste, #txt2img_tools_group #paste, #paste").first.click()
    page.wait_for_function("() => document.querySelector('#txt2img_steps input[type=number]').value == '7'")
    number = "#scfg_{}_txt2img input[type=number]"
    assert page.locator(number.format("strength")).first.input_value() == "1"
    assert page.locator(number.format("max_rate")).first.input_value() == "2.5"
    assert page.locator(number.format("min_rate")).first.input_value() == "0.8"
    assert page.locator("#txt2img_seed input[type=number]").first.input_value() == "4242"
    assert page.locator("#txt2img_prompt textarea").input_value() == "a garbled one"


def gallery_pixels(page):
    from io import BytesIO

    from PIL import Image

    src = page.locator("#txt2img_gallery img").first.get_attribute("src")
    if not src.startswith("http"):
        src = URL.rstrip("/") + "/" + src.lstrip("/")
    with urllib.request.urlopen(src, timeout=60) as response:
        return Image.open(BytesIO(response.read())).convert("RGB").tobytes()


def decoded(b64):
    import base64
    from io import BytesIO

    from PIL import Image

    return Image.open(BytesIO(base64.b64decode(b64.split(",", 1)[-1]))).convert("RGB").tobytes()


def last_run():
    from tests.e2e.client import api_call

    return api_call(URL.rstrip("/"), "/scfg/v1/status")[1]["last_run"]


def ui_generate(page, seed, timeout=900):
    """Generate from the UI as it is set up; return the pixels of its image once it has finished.

    Finished: the status route reports a newer run with this generation's seed (runs of equal
    settings give equal infotexts, so the page alone cannot tell a new result from the last
    one), and the UI shows its Generate button and infotext again."""
    before = last_run()["run"]
    page.locator("#txt2img_generate").click()
    deadline = time.time() + timeout
    while True:
        run = last_run()
        if run["run"] > before and run["seed"] == seed:
            break
        assert time.time() < deadline, f"no UI run with seed {seed} finished within {timeout} s: {run}"
        time.sleep(0.5)
    page.locator("#txt2img_generate").wait_for(state="visible", timeout=120_000)
    info = page.locator("#html_info_txt2img").filter(has_text="S-CFG strength")
    info.filter(has_text=f"Seed: {seed}").first.wait_for(timeout=120_000)
    return gallery_pixels(page)


def test_a_ui_generation_while_an_api_request_runs(page):
    """The WebUI queues a UI generation behind a running API request: each result equals the same
    request run alone, no hook is left, and the status route names the generation that ran last."""
    import threading

    from tests.e2e.client import api_call

    page.locator("#txt2img_prompt textarea").fill("a red cube on a blue floor")
    for elem_id, value in (("txt2img_width", 64), ("txt2img_height", 64), ("txt2img_steps", 4),
                           ("txt2img_seed", 99), ("scfg_strength_txt2img", 1)):
        set_number(page, elem_id, value)
    header = page.locator("#scfg_txt2img .input-accordion-checkbox").first
    if not header.is_checked():
        header.click()
    api_body = {"prompt": "a blue house under a green tree", "seed": 5, "steps": 24, "width": 64,
                "height": 64, "cfg_scale": 7, "sampler_name": "Euler", "save_images": False,
                "alwayson_scripts": {"S-CFG": {"args": [{"enabled": True, "max_rate": 2.0}]}}}
    ui_alone = ui_generate(page, 99)
    code, api_alone = api_call(URL.rstrip("/"), "/sdapi/v1/txt2img", api_body)
    assert code == 200, api_alone

    result = {}
    worker = threading.Thread(target=lambda: result.update(api=api_call(URL.rstrip("/"), "/sdapi/v1/txt2img",
                                                                        api_body)))
    worker.start()
    deadline = time.time() + 300
    while time.time() < deadline:  # the API request is sampling: now ask from the UI
        _, progress = api_call(URL.rstrip("/"), "/sdapi/v1/progress?skip_current_image=true")
        if progress["state"]["sampling_step"] >= 1:
            break
        time.sleep(0.05)
    assert worker.is_alive(), "the API request finished before the UI asked: no overlap to test"
    ui_together = ui_generate(page, 99)
    worker.join(900)
    code, api_together = result["api"]
    assert code == 200, api_together
    assert ui_together == ui_alone, "the UI generation differs from the same one run alone"
    assert [decoded(b) for b in api_together["images"]] == [decoded(b) for b in api_alone["images"]], \
        "the API image differs from the same request run alone"
    _, status = api_call(URL.rstrip("/"), "/scfg/v1/status")
    assert status["hooks_installed"] == [] and status["last_run"]["seed"] == 99, status

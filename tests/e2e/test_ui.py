"""The S-CFG accordion in a real WebUI page, in headless Chromium (Playwright).

Skipped unless SCFG_UI_URL (or SCFG_A1111_URL / SCFG_FORGE_URL) points at a running WebUI started
with its Gradio UI and this extension, and Playwright plus a Chromium (SCFG_CHROMIUM, default
/usr/bin/chromium) are installed. Enables S-CFG, generates, reads the infotext, then pastes an
infotext with non-default S-CFG values back and checks the controls follow.
"""

import json
import os
import re
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


def set_number(page, elem_id, value):
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

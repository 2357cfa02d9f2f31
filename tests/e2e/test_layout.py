"""The S-CFG accordion's layout in a real WebUI page, at a laptop's 1366×768, in headless Chromium.

Skipped unless SCFG_UI_URL (or SCFG_A1111_URL / SCFG_FORGE_URL) points at a running WebUI with its
Gradio UI, --api and this extension, and Playwright (pip install playwright) with a Chromium
(SCFG_CHROMIUM, default /usr/bin/chromium). SCFG_SCREENSHOT_DIR, when set, receives the screenshots
(light and dark theme) that the README shows; SCFG_SCREENSHOT_NAME names them (default: the host).
"""

import base64
import json
import os
import urllib.request

import pytest

from scfg_ext.params import FIELDS
from tests.e2e.client import api_call

URL = (os.environ.get("SCFG_UI_URL") or os.environ.get("SCFG_A1111_URL")
       or os.environ.get("SCFG_FORGE_URL") or "").rstrip("/")
CHROMIUM = os.environ.get("SCFG_CHROMIUM", "/usr/bin/chromium")
SHOTS = os.environ.get("SCFG_SCREENSHOT_DIR", "")
VIEWPORT = {"width": 1366, "height": 768}
FLAGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-quic"]

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(not URL, reason="set SCFG_UI_URL to a running WebUI with its UI and S-CFG"),
              pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"no Chromium at {CHROMIUM}")]


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield browser
        browser.close()


def open_page(browser, theme="light"):
    page = browser.new_page(viewport=VIEWPORT)
    page.set_default_timeout(120_000)
    page.goto(f"{URL}/?__theme={theme}")
    page.wait_for_selector("#txt2img_prompt textarea")
    page.wait_for_selector("#scfg_txt2img")
    return page


def is_open(page, elem_id):
    return page.evaluate(f"() => !!document.querySelector('#{elem_id} .label-wrap.open')")


def toggle(page, elem_id):
    page.locator(f"#{elem_id} > .label-wrap, #{elem_id} .label-wrap").first.click()


def host_name():
    with urllib.request.urlopen(f"{URL}/scfg/v1/status", timeout=30) as response:
        status = json.load(response)
    return status.get("host_name") or status.get("host", "webui")


def shot(locator, name, tmp_path):
    folder = SHOTS or str(tmp_path)
    tag = os.environ.get("SCFG_SCREENSHOT_NAME") or host_name().split()[0].lower()
    locator.screenshot(path=os.path.join(folder, f"ui-{tag}-{name}.png"))


@pytest.mark.parametrize("theme", ["light", "dark"])
def test_open_accordion_fits_one_screen_and_advanced_toggles(browser, theme, tmp_path):
    page = open_page(browser, theme)
    accordion = page.locator("#scfg_txt2img")
    toggle(page, "scfg_txt2img")
    page.wait_for_selector("#scfg_strength_txt2img", state="visible")
    for name in ("strength", "min_rate", "max_rate", "start", "end", "show_maps", "overlay"):
        assert page.locator(f"#scfg_{name}_txt2img").is_visible(), name
    for name in ("preset", "refine_power", "region", "max_scale", "levels", "hires", "hires_strength"):
        assert not page.locator(f"#scfg_{name}_txt2img").is_visible(), name
    box = accordion.bounding_box()
    assert box["height"] <= VIEWPORT["height"], box
    assert "steps 20 of 20" in page.locator("#scfg_picture_txt2img").first.inner_text()  # gradio 3: 2 ids
    shot(accordion, theme, tmp_path)

    toggle(page, "scfg_advanced_txt2img")
    page.wait_for_selector("#scfg_preset_txt2img", state="visible")
    for name in ("refine_power", "region", "max_scale", "levels", "hires"):
        assert page.locator(f"#scfg_{name}_txt2img").is_visible(), name
    assert not page.locator("#scfg_hires_strength_txt2img").is_visible()  # hires "same"
    if theme == "light":
        shot(accordion, "advanced", tmp_path)
    toggle(page, "scfg_advanced_txt2img")
    page.wait_for_selector("#scfg_preset_txt2img", state="hidden")
    page.close()


def test_hires_values_only_for_own_and_picture_follows_cfg(browser):
    page = open_page(browser)
    toggle(page, "scfg_txt2img")
    toggle(page, "scfg_advanced_txt2img")
    page.wait_for_selector("#scfg_hires_txt2img", state="visible")
    page.locator("#scfg_hires_txt2img label", has_text="own").click()
    page.wait_for_selector("#scfg_hires_strength_txt2img", state="visible")
    assert page.locator("#scfg_hires_max_rate_txt2img").is_visible()
    page.locator("#scfg_hires_txt2img label", has_text="same").click()
    page.wait_for_selector("#scfg_hires_strength_txt2img", state="hidden")
    assert not page.locator("#scfg_hires_img2img").is_visible()  # img2img has no hires fix

    box = page.locator("#txt2img_cfg_scale input[type=number]").first
    box.fill("4")
    box.press("Enter")
    page.wait_for_function("() => document.querySelector('#scfg_picture_txt2img').innerText"
                           ".includes('CFG 3.2 to 12.0 instead of 4')")
    page.close()


def test_every_control_keeps_its_elem_id(browser):
    page = open_page(browser)
    for tab in ("txt2img", "img2img"):
        assert page.locator(f"#scfg_{tab}").count() == 1
        for field in FIELDS[1:]:
            assert page.locator(f"#scfg_{field.name}_{tab}").count() == 1, (tab, field.name)
    page.close()


def test_png_info_send_to_txt2img_opens_advanced_for_an_advanced_value(browser, tmp_path):
    body = {"prompt": "a red apple", "steps": 4, "width": 64, "height": 64, "seed": 1,
            "alwayson_scripts": {"S-CFG": {"args": [{"enabled": True, "preset": "paper", "max_rate": 2.5}]}}}
    code, result = api_call(URL, "/sdapi/v1/txt2img", body)
    assert code == 200, result
    image = tmp_path / "scfg.png"
    image.write_bytes(base64.b64decode(result["images"][0].split(",", 1)[-1]))

    page = open_page(browser)
    assert not is_open(page, "scfg_advanced_txt2img")
    page.get_by_role("tab", name="PNG Info").or_(page.get_by_role("button", name="PNG Info")).first.click()
    page.locator("#pnginfo_image input[type=file]").set_input_files(str(image))
    page.wait_for_function("() => (document.querySelector('#html_info_pnginfo, #pnginfo_html_info')"
                           " || document.body).innerText.includes('S-CFG preset: paper')")
    page.get_by_role("button", name="Send to txt2img").first.click()
    page.wait_for_selector("#scfg_preset_txt2img", state="visible")
    assert page.locator("#scfg_preset_txt2img input[value=paper]").first.is_checked()
    assert page.locator("#scfg_max_rate_txt2img input[type=number]").first.input_value() == "2.5"
    assert page.locator("#scfg_txt2img .input-accordion-checkbox").first.is_checked()
    assert is_open(page, "scfg_advanced_txt2img")
    page.close()

"""Install S-CFG the way users do: Extensions → Install from URL → Installed → Apply and restart UI.

Needs a WebUI without this extension, started like webui.sh starts it (SD_WEBUI_RESTART set and a
loop that starts it again when it exits with tmp/restart written), with its UI and --api:
SCFG_INSTALL_URL=http://127.0.0.1:7871. SCFG_INSTALL_REPO is the git URL to install from (default:
this checkout; git accepts a local path, and the clone takes what is committed). Skipped, saying
why, when unset, when S-CFG is already installed there, or when the WebUI cannot restart itself.
"""

import os
import pathlib
import time
import urllib.error
import urllib.request

import pytest

URL = os.environ.get("SCFG_INSTALL_URL", "").rstrip("/")
REPO = os.environ.get("SCFG_INSTALL_REPO") or str(pathlib.Path(__file__).resolve().parents[2])
CHROMIUM = os.environ.get("SCFG_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-quic"]

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(not URL, reason="set SCFG_INSTALL_URL to a WebUI without S-CFG, started "
                                 "with a restart loop (webui.sh), its UI and --api"),
              pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"no Chromium at {CHROMIUM}")]


def answers(path="/scfg/v1/status") -> bool:
    try:
        with urllib.request.urlopen(URL + path, timeout=10) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def wait_for_restart(timeout=900):
    """The server goes away, then answers again."""
    deadline = time.time() + timeout
    while answers("/sdapi/v1/options") and time.time() < deadline:
        time.sleep(1)
    while not answers("/sdapi/v1/options"):
        assert time.time() < deadline, "the WebUI did not come back after Apply and restart"
        time.sleep(2)


def tab(page, name):
    """A tab button (gradio 3 renders tabs as buttons, gradio 4 as role=tab)."""
    by_role = page.get_by_role("tab", name=name, exact=True)
    by_role.or_(page.get_by_role("button", name=name, exact=True)).first.click()


def test_install_from_url_and_restart_shows_the_accordion():
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    if answers():
        pytest.skip(f"S-CFG is already installed in the WebUI at {URL}")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        page = browser.new_page(viewport={"width": 1366, "height": 900})
        page.set_default_timeout(300_000)
        page.goto(URL + "/")
        page.wait_for_selector("#txt2img_prompt textarea")
        assert page.locator("#scfg_txt2img").count() == 0
        tab(page, "Extensions")
        tab(page, "Install from URL")
        page.get_by_label("URL for extension's git repository").fill(REPO)
        page.get_by_label("Local directory name").fill("sd-webui-scfg")
        page.get_by_role("button", name="Install", exact=True).click()
        page.wait_for_function("() => document.querySelector('#extension_install_result').innerText"
                               ".includes('Installed into')")
        tab(page, "Installed")
        # Apply reads the table's checkboxes and does nothing until they are there (Forge fills it late)
        page.wait_for_selector("#extensions input[name='enable_sd-webui-scfg']", state="attached")
        apply = page.locator("#extensions_installed_top button").filter(has_text="Apply and")
        if "restart" not in apply.inner_text():
            pytest.skip("the WebUI was started without SD_WEBUI_RESTART and a restart loop: 'Apply and "
                        "quit' would stop it (the extension is installed; restart it by hand)")
        apply.click()
        wait_for_restart()
        page.goto(URL + "/")
        page.wait_for_selector("#txt2img_prompt textarea")
        for name in ("txt2img", "img2img"):
            page.wait_for_selector(f"#scfg_{name}", state="attached")
            assert page.locator(f"#scfg_strength_{name}").count() == 1
        assert answers()
        browser.close()

"""End-to-end: the X/Y/Z plot's [S-CFG] axes, driven through the API of each running host.

Runs against SCFG_A1111_URL and/or SCFG_FORGE_URL (skipped for a host that is not set). The axes are
registered in on_before_ui, which a WebUI started with --nowebui never fires: such a host is skipped
with that reason.
"""

import base64
import io
import json
import os

import pytest

from scfg_ext.params import FIELDS
from tests.e2e.client import api_call

HOSTS = {"a1111": os.environ.get("SCFG_A1111_URL", ""), "forge": os.environ.get("SCFG_FORGE_URL", "")}
BASE = dict(prompt="a red apple on a wooden table, a cat", negative_prompt="blurry", seed=1234, steps=4,
            width=64, height=64, cfg_scale=7.0, sampler_name="Euler", batch_size=1, n_iter=1,
            save_images=False, send_images=True)

pytestmark = pytest.mark.e2e


def pixels(b64):
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(b64.split(",", 1)[-1]))).convert("RGB").tobytes()


def axis_index(url, label):
    """The txt2img X/Y/Z plot's index of an axis (the API takes the index, as the UI's dropdown)."""
    code, scripts = api_call(url, "/sdapi/v1/script-info")
    assert code == 200, scripts
    xyz = next(s for s in scripts if s["name"] == "x/y/z plot" and not s["is_img2img"])
    choices = xyz["args"][0]["choices"]
    if label not in choices:
        pytest.skip(f"no {label!r} axis: the WebUI was started without its UI (on_before_ui never ran)")
    return choices.index(label)


# The X/Y/Z plot's controls after the three axes, by label: what the cases need, the rest at the
# host's own defaults (reForge has 21 args, A1111 / Forge / Neo 18).
XYZ_SETTINGS = {"Draw legend": True, "Include Sub Images": True, "Include Sub Grids": False,
                "Keep -1 for seeds": False, "Vary seeds for X": False, "Vary seeds for Y": False,
                "Vary seeds for Z": False}


def xyz_args(url, x_type, x_values="", x_choices=()):
    """The txt2img X/Y/Z plot's script_args, built from the host's /sdapi/v1/script-info: axes X
    (type index, text values, dropdown values), Y and Z unused, lone images on, no sub grids."""
    code, scripts = api_call(url, "/sdapi/v1/script-info")
    assert code == 200, scripts
    xyz = next(s for s in scripts if s["name"] == "x/y/z plot" and not s["is_img2img"])
    args = [XYZ_SETTINGS.get(a["label"], a["value"]) for a in xyz["args"]]
    args[:9] = [x_type, x_values, list(x_choices), 0, "", [], 0, "", []]
    return args


@pytest.mark.parametrize("host", ["a1111", "forge"])
def test_xyz_axes_set_scfg_parameters(host):
    url = HOSTS[host].rstrip("/")
    if not url:
        pytest.skip(f"SCFG_{host.upper()}_URL is not set")
    enabled = [True] + [f.default for f in FIELDS[1:]]
    enabled[[f.name for f in FIELDS].index("min_rate")] = 1.0
    code, plain = api_call(url, "/sdapi/v1/txt2img", BASE)
    assert code == 200, plain
    body = {**BASE, "script_name": "x/y/z plot",
            "script_args": xyz_args(url, axis_index(url, "[S-CFG] Max rate"), "1, 3"),
            "alwayson_scripts": {"S-CFG": {"args": enabled}}}
    code, grid = api_call(url, "/sdapi/v1/txt2img", body)
    assert code == 200, grid
    infotexts = json.loads(grid["info"])["infotexts"]
    lone = {text.split("S-CFG max rate: ")[1].split(",")[0]: image
            for text, image in zip(infotexts, grid["images"], strict=True) if "S-CFG max rate: " in text}
    assert set(lone) == {"1.0", "3.0"}, infotexts
    assert pixels(lone["1.0"]) == pixels(plain["images"][0]), "max rate 1 with min rate 1 is plain CFG"
    assert pixels(lone["3.0"]) != pixels(plain["images"][0]), "max rate 3 must let S-CFG act"

    for order in (["False", "True"], ["True", "False"]):  # X/Y/Z shares one infotext dict between cells
        body["script_args"] = xyz_args(url, axis_index(url, "[S-CFG] Enabled"), x_choices=order)
        body["alwayson_scripts"] = {"S-CFG": {"args": [False]}}
        code, toggled = api_call(url, "/sdapi/v1/txt2img", body)
        assert code == 200, toggled
        cells = json.loads(toggled["info"])["infotexts"][1:]  # [grid, cell 1, cell 2]
        assert len(cells) == 2, cells
        for value, text in zip(order, cells, strict=True):
            assert ("S-CFG strength" in text) == (value == "True"), (order, text)

"""The WebUI script (scripts/scfg_guidance.py) with stand-ins for gradio and A1111's modules.

Only the script's bookkeeping is tested here (teardown on close, per-cell infotext, last run);
the real WebUIs run it in tests/e2e.
"""

import copy
import importlib.util
import pathlib
import sys
import types
from types import SimpleNamespace

import pytest

SCRIPT = pathlib.Path(__file__).parents[1] / "scripts" / "scfg_guidance.py"


@pytest.fixture
def script(monkeypatch):
    fakes = {
        "gradio": {},
        "modules": {},
        "modules.scripts": {"Script": object, "AlwaysVisible": object(), "scripts_data": []},
        "modules.script_callbacks": {name: (lambda *a, **k: None) for name in (
            "on_before_ui", "on_app_started", "on_infotext_pasted", "on_ui_settings")},
    }
    for name, attrs in fakes.items():
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, module)
    sys.modules["modules"].scripts = sys.modules["modules.scripts"]
    sys.modules["modules"].script_callbacks = sys.modules["modules.script_callbacks"]
    spec = importlib.util.spec_from_file_location("scfg_guidance_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    teardowns = []
    monkeypatch.setattr(module, "HOOKS", SimpleNamespace(teardown=lambda: teardowns.append(1)))
    module.teardowns = teardowns
    return module


class P:
    def __init__(self):
        self.extra_generation_params, self.closed = {}, 0

    def close(self):
        self.closed += 1


def test_a_reused_p_is_wrapped_once(script):
    """The img2img batch tab runs process() for every image on one p: no RecursionError."""
    p, runner = P(), script.Script()
    for _ in range(3000):
        runner.process(p, True)
    p.close()
    assert p.closed == 1 and len(script.teardowns) == 3000 + 1


def test_grid_cells_keep_their_own_infotext_and_off_cells_none(script):
    """X/Y/Z copies p shallowly: the cells share one extra_generation_params dict unless we copy it."""
    outer, runner = P(), script.Script()
    runner.setup(outer, True)
    on, off = copy.copy(outer), copy.copy(outer)
    runner.process(on, {"enabled": True, "max_rate": 2.5})
    runner.process(off, {"enabled": False})
    assert on.extra_generation_params["S-CFG max rate"] == "2.5"
    assert not any(k.startswith("S-CFG") for k in off.extra_generation_params)
    assert outer.extra_generation_params == {}
    off.close()  # the copies share the outer p's close: an exception in a cell still tears down
    assert script.teardowns


def test_warning_is_a_plain_string_and_the_outer_run_is_the_last(script):
    outer, nested, runner = P(), P(), script.Script()
    runner.process(outer, True)
    runner.process(nested, True)  # ADetailer's p, processed inside the outer run's postprocessing
    outer._scfg[1].fallback("boom", warn=True)
    runner.postprocess_batch(nested)
    runner.postprocess_batch(outer)
    assert outer.extra_generation_params["S-CFG warning"] == "boom (1 steps)"
    assert "S-CFG warning" not in nested.extra_generation_params
    assert script.LAST["report"] is outer._scfg[1]


def test_a_teardown_that_raises_is_one_warning_never_an_error(script, monkeypatch, caplog):
    def broken():
        raise RuntimeError("injected test fault in teardown")

    monkeypatch.setattr(script, "HOOKS", SimpleNamespace(teardown=broken))
    p, runner = P(), script.Script()
    runner.setup(p, True)
    runner.process(p, True)
    runner.postprocess_batch(p)
    runner.postprocess(p, SimpleNamespace(images=[]))
    p.close()
    assert p.closed == 1
    assert p.extra_generation_params["S-CFG warning"] == "teardown failed: injected test fault in teardown"
    assert sum("teardown failed" in r.getMessage() for r in caplog.records) == 1


def test_a_preview_that_raises_keeps_the_images_and_warns(script, monkeypatch):
    monkeypatch.setattr(script, "HOOKS", SimpleNamespace(teardown=lambda: None))
    p, runner = P(), script.Script()
    p.is_api = False
    runner.process(p, {"enabled": True, "overlay": True, "test_fault": "preview"})
    report = p._scfg[1]
    report.previews[(0, 0)] = ["a recorded step"]
    processed = SimpleNamespace(images=["image"], infotexts=["info"], index_of_first_image=0)
    runner.postprocess(p, processed)
    assert processed.images == ["image"] and processed.infotexts == ["info"]
    assert report.notes == ["could not draw the previews: injected test fault in preview"]


def test_the_status_route_names_the_last_generation_on_or_off(script):
    """Generations run one at a time: the last one reported is the last one run, S-CFG on or off."""
    runner = script.Script()
    on, off, bad = P(), P(), P()
    on.all_seeds, off.all_seeds, bad.all_seeds = [11, 12], [21], [31]
    runner.process(on, True)
    runner.postprocess_batch(on)
    last = script.LAST["report"].as_dict()
    assert last["enabled"] is True and last["seed"] == 11
    runner.process(off, False)
    last = script.LAST["report"].as_dict()
    assert last["enabled"] is False and last["seed"] == 21 and last["steps_applied"] == 0
    runner.process(bad, {"enabled": True, "strength": 99})
    assert script.LAST["report"].as_dict()["seed"] == 31 and "strength" in script.LAST["error"]
    p = P()  # no seeds at all (a stand-in p): the report still forms
    runner.process(p, False)
    assert script.LAST["report"].as_dict()["seed"] is None


def test_xyz_helpers_fall_back_when_the_host_moves_them(script, monkeypatch):
    """Neither the X/Y/Z module nor lib_xyz has them: our own (A1111's) helpers, never an ImportError."""
    monkeypatch.setitem(sys.modules, "lib_xyz", None)  # import lib_xyz.* raises ImportError
    apply_field, boolean_choice = script._xyz_helpers(types.ModuleType("xyz_grid"))
    p = SimpleNamespace()
    apply_field("scfg_max_rate")(p, 2.5, [2.5])
    assert p.scfg_max_rate == 2.5 and boolean_choice(reverse=True)() == ["False", "True"]

"""The accordion's layout, built by the real script with a stand-in gradio that records the tree.

The browser tests (tests/e2e/test_layout.py) check the same layout in the real WebUIs; these check
what must hold on every host before a browser is involved: positional order, labels, placement.
"""

import importlib.util
import pathlib
import sys
import types
import typing
from types import SimpleNamespace

import pytest

from scfg_ext.params import FIELDS, infotext_key

SCRIPT = pathlib.Path(__file__).parents[1] / "scripts" / "scfg_guidance.py"


class Node:
    """A gradio component or layout block: remembers its kwargs, parent and events."""
    stack: typing.ClassVar[list] = []

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs, self.children, self.events = args, kwargs, [], []
        self.parent = Node.stack[-1] if Node.stack else None
        if self.parent is not None:
            self.parent.children.append(self)

    def __enter__(self):
        Node.stack.append(self)
        return self

    def __exit__(self, *exc):
        Node.stack.pop()

    def __getattr__(self, event):  # .change / .focus / ...
        if event.startswith("_"):
            raise AttributeError(event)
        return lambda fn, inputs=None, outputs=None, **kw: self.events.append((event, fn, inputs, outputs))

    def ancestors(self):
        node = self.parent
        while node is not None:
            yield node
            node = node.parent


def kind(name):
    return type(name, (Node,), {})


@pytest.fixture
def built(monkeypatch):
    gradio = types.ModuleType("gradio")
    for name in ("HTML", "Slider", "Radio", "Checkbox", "Dropdown", "Row", "Accordion", "Textbox"):
        setattr(gradio, name, kind(name))
    gradio.update = lambda **kw: kw
    components = types.ModuleType("modules.ui_components")
    components.InputAccordion = kind("InputAccordion")
    shared = types.ModuleType("modules.shared")
    shared.opts = SimpleNamespace(scfg_default_max_rate=2.5)
    sd_models = types.ModuleType("modules.sd_models")
    sd_models.model_data = SimpleNamespace(sd_model=None)
    fakes = {
        "gradio": gradio, "modules.ui_components": components, "modules.shared": shared,
        "modules.sd_models": sd_models, "modules": types.ModuleType("modules"),
        "modules.scripts": types.ModuleType("modules.scripts"),
        "modules.script_callbacks": types.ModuleType("modules.script_callbacks"),
    }
    fakes["modules.scripts"].__dict__.update(Script=object, AlwaysVisible=object(), scripts_data=[])
    for name in ("on_before_ui", "on_app_started", "on_infotext_pasted", "on_ui_settings",
                 "on_cfg_denoiser", "on_cfg_denoised"):
        setattr(fakes["modules.script_callbacks"], name, lambda *a, **k: None)
    for name, module in fakes.items():
        monkeypatch.setitem(sys.modules, name, module)
    for name in ("scripts", "script_callbacks", "shared", "sd_models", "ui_components"):
        setattr(fakes["modules"], name, fakes[f"modules.{name}"])
    spec = importlib.util.spec_from_file_location("scfg_guidance_ui_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    script = module.Script()
    cfg, steps = Node(elem_id="txt2img_cfg_scale"), Node(elem_id="txt2img_steps")
    script.after_component(cfg, elem_id="txt2img_cfg_scale")
    script.after_component(steps, elem_id="txt2img_steps")
    controls = script.ui(False)
    return SimpleNamespace(module=module, script=script, controls=controls, cfg=cfg, steps=steps)


def test_controls_keep_their_positional_order_and_elem_ids(built):
    assert len(built.controls) == len(FIELDS)
    ids = [c.kwargs["elem_id"] for c in built.controls]
    assert ids == ["scfg_txt2img"] + [f"scfg_{f.name}_txt2img" for f in FIELDS[1:]]  # the accordion: enabled


def test_open_accordion_holds_the_main_controls_the_rest_is_advanced(built):
    by_name = {f.name: c for f, c in zip(FIELDS, built.controls, strict=True)}
    for name, control in list(by_name.items())[1:]:
        advanced = [a for a in control.ancestors() if type(a).__name__ == "Accordion"]
        assert bool(advanced) == (name not in built.module.MAIN), name
    accordion = next(a for a in by_name["preset"].ancestors() if type(a).__name__ == "Accordion")
    assert accordion.kwargs.get("open") is False and accordion.args == ("Advanced",)
    rows = [c.parent for c in built.controls[1:] if type(c.parent).__name__ == "Row"]
    assert all(len(row.children) <= 3 for row in rows)  # two per row; the hires row has three


def test_labels_are_plain_words(built):
    labels = [c.kwargs["label"] for c in built.controls[1:]]
    assert "Steps" not in labels and "Refinement power R" in labels
    assert not any(ch in label for label in labels for ch in "²γη=()")
    assert all("info" not in c.kwargs for c in built.controls[1:])  # notation is hover text only


def test_hires_values_only_for_own(built):
    by_name = {f.name: c for f, c in zip(FIELDS, built.controls, strict=True)}
    row = by_name["hires_strength"].parent
    assert row.kwargs["visible"] is False
    (_event, fn, _inputs, outputs), = [e for e in by_name["hires"].events if e[0] == "change"]
    assert outputs is row and fn("own") == {"visible": True} and fn("same") == {"visible": False}


def test_levels_offer_the_models_levels(built):
    levels = built.controls[[f.name for f in FIELDS].index("levels")]
    assert type(levels).__name__ == "Dropdown" and levels.kwargs["choices"][0] == "auto"
    assert {"4", "8", "4,8"} <= set(levels.kwargs["choices"])


def test_settings_defaults_apply_and_skip_ui_config(built):
    by_name = {f.name: c for f, c in zip(FIELDS, built.controls, strict=True)}
    assert by_name["max_rate"].kwargs["value"] == 2.5 and by_name["max_rate"].do_not_save_to_config
    assert by_name["strength"].kwargs["value"] == 1.0


def test_a_pasted_advanced_value_opens_advanced(built):
    keys = dict(built.script.infotext_fields[1:2])
    (flag, opens), = keys.items()
    default = {"S-CFG": "True", infotext_key(FIELDS[1]): "1.5"}
    assert not opens(default)  # strength is a main control
    assert opens({**default, "S-CFG preset": "paper"})
    assert not opens({**default, "S-CFG preset": "official"})
    assert not opens({"S-CFG preset": "paper"})  # S-CFG was off in that image
    (_event, fn, _inputs, _outputs), = flag.events
    assert fn(True) == ({"open": True}, False) and fn(False) == ({}, False)


def test_the_picture_follows_the_webuis_cfg_and_steps(built):
    inputs = {id(e[2][-2]) for e in built.cfg.events}
    assert inputs == {id(built.cfg)} and built.steps.events  # both trigger a redraw
    (_event, fn, inputs, picture), = built.cfg.events
    html = fn(1.0, 0.8, 3.0, 15.0, 0.0, 0.5, 5.0, 10)
    assert "steps 5 of 10" in html and "CFG 4.0 to 15.0 instead of 5" in html
    assert picture.kwargs["elem_id"] == "scfg_picture_txt2img"

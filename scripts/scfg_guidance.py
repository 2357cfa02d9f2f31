"""S-CFG for AUTOMATIC1111 WebUI and WebUI Forge: UI, infotext, XYZ axes, API args, status route.

This file only speaks to the WebUI's script API. The math is in ``scfg_ext`` and the host hooks in
``scfg_ext.hosts.a1111`` / ``scfg_ext.hosts.forge``; the host is detected once at import.
"""

import logging

import gradio as gr
import modules.scripts as scripts
from modules import script_callbacks

from scfg_ext import (
    FIELDS,
    ScfgParamError,
    ScfgParams,
    __version__,
    explain,
    from_script_args,
    make_params,
    to_infotext,
)
from scfg_ext.hosts import adapter, common, detect_host, host_name
from scfg_ext.levels import level_choices
from scfg_ext.params import (
    FIELD_BY_NAME,
    INFOTEXT_PREFIX,
    OLD_INFOTEXT_KEYS,
    infotext_key,
    sanitize_infotext,
)
from scfg_ext.preview import overlay, render, split_and
from scfg_ext.report import RunReport
from scfg_ext.webapi import ApiArgsCheck, status_payload

log = logging.getLogger("scfg")
HOST = detect_host()
HOST_NAME = host_name(HOST)
HOOKS = adapter(HOST)
LAST = {"report": RunReport(host=HOST), "error": None}
PENDING: list[str] = []  # teardown failures seen before a generation's report exists

# Visible labels in plain words; the paper's notation goes in the hover text (javascript/scfg.js).
LABELS = {
    "strength": "Strength",
    "preset": "Preset",
    "refine_power": "Refinement power R",
    "region": "Benchmark region",
    "min_rate": "Min rate",
    "max_rate": "Max rate",
    "max_scale": "Max effective CFG",
    "start": "Start at step",
    "end": "End at step",
    "levels": "Attention levels",
    "hires": "Hires fix pass",
    "hires_strength": "Hires strength",
    "hires_min_rate": "Hires min rate",
    "hires_max_rate": "Hires max rate",
    "show_maps": "Show maps",
    "overlay": "Regions over the image",
}
# The controls in the open accordion; everything else sits in the nested, closed Advanced one.
MAIN = ("strength", "min_rate", "max_rate", "start", "end", "show_maps", "overlay")
# Defaults a user can keep on the Settings page (S-CFG section); applied when the UI is built.
SETTINGS_DEFAULTS = ("strength", "min_rate", "max_rate", "start", "end")
USAGE = "#using-s-cfg"


def _component(field, tab, value=None, **extra):
    """One gradio control for a parameter field (the portable gradio 3/4 subset)."""
    elem_id = f"scfg_{field.name}_{tab}"
    label = LABELS[field.name]
    value = field.default if value is None else value
    if field.name == "levels":
        return gr.Dropdown(choices=_level_choices(), value=value, label=label, elem_id=elem_id,
                           allow_custom_value=True, **extra)
    if field.choices is not None:
        return gr.Radio(choices=list(field.choices), value=value, label=label, elem_id=elem_id, **extra)
    if isinstance(field.default, bool):
        return gr.Checkbox(value=value, label=label, elem_id=elem_id, **extra)
    step = 1 if isinstance(field.default, int) else 0.05
    return gr.Slider(minimum=field.low, maximum=field.high, step=step, value=value, label=label,
                     elem_id=elem_id, **extra)


def _level_choices() -> list[str]:
    """auto and the levels of the loaded model (SD1.x's when none is loaded yet: never load one)."""
    try:
        from modules import sd_models

        unet = common.loaded_unet(getattr(sd_models.model_data, "sd_model", None))
        present = {s.factor for s in common.transformer_sites(unet)} if unet is not None else set()
    except Exception:
        present = set()
    return level_choices(present or {1, 2, 4, 8})


def _setting_default(name: str):
    from modules import shared

    field = FIELD_BY_NAME[name]
    try:
        value = getattr(shared.opts, f"scfg_default_{name}", field.default)
        return getattr(make_params(**{name: value}), name)
    except Exception:  # a hand-edited config.json: the built-in default
        return field.default


def _picture_args(values: dict) -> dict:
    return {name: values.get(name, FIELD_BY_NAME[name].default) for name in explain.INPUTS}


def _usage_link() -> str:
    """The README's usage section: on the repository's web page when installed from one."""
    import pathlib
    import subprocess

    root = pathlib.Path(__file__).resolve().parents[1]
    try:
        remote = subprocess.run(["git", "-C", str(root), "remote", "get-url", "origin"], capture_output=True,
                                text=True, timeout=5).stdout.strip()
    except Exception:
        remote = ""
    if remote.startswith(("https://", "http://")):
        return remote.removesuffix(".git") + USAGE
    return f"file={root / 'README.md'}"


def _note() -> str:
    return (f'<p class="scfg-note">Gives each region that the prompt names its own CFG scale, balanced '
            f'against the rest of the image. <a href="{_usage_link()}" target="_blank">How to use</a> · '
            f'v{__version__} on {HOST_NAME}; SD1.x, SD2.x and SDXL (not DiT models such as Flux)</p>')


def _advanced_pasted(pairs: dict) -> bool:
    """Whether a pasted infotext sets an advanced control away from its default (then Advanced opens)."""
    if INFOTEXT_PREFIX not in pairs:
        return False
    for field in FIELDS[1:]:
        key = infotext_key(field)
        if field.name in MAIN or key not in pairs:
            continue
        if str(pairs[key]).strip() != str(field.default):
            return True
    return False


def _xyz_overrides(p) -> dict:
    """Values set on p by our X/Y/Z plot axes (p.scfg_<field>)."""
    return {f.name: getattr(p, f"scfg_{f.name}") for f in FIELDS if hasattr(p, f"scfg_{f.name}")}


def _params_for(p, args) -> ScfgParams:
    params = from_script_args(args)
    overrides = _xyz_overrides(p)
    if overrides:
        values = {f.name: getattr(params, f.name) for f in FIELDS}
        params = make_params(**{**values, **overrides})
    return params


class Script(scripts.Script):
    def title(self):
        return "S-CFG"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        from modules.ui_components import InputAccordion

        tab = "img2img" if is_img2img else "txt2img"
        by_name = {}
        keep = {name: _setting_default(name) for name in SETTINGS_DEFAULTS}

        def control(name, **extra):
            by_name[name] = _component(FIELD_BY_NAME[name], tab, keep.get(name), **extra)
            if name in keep:  # its default lives on the Settings page, not in ui-config.json
                by_name[name].do_not_save_to_config = True
            return by_name[name]

        with InputAccordion(False, label="S-CFG", elem_id=f"scfg_{tab}") as enabled:
            gr.HTML(_note(), elem_id=f"scfg_note_{tab}")
            control("strength")
            with gr.Row():
                control("min_rate")
                control("max_rate")
            with gr.Row():
                control("start")
                control("end")
            picture = gr.HTML(explain.picture(**_picture_args(keep)), elem_id=f"scfg_picture_{tab}")
            with gr.Row():
                control("show_maps")
                control("overlay")
            with gr.Accordion("Advanced", open=False, elem_id=f"scfg_advanced_{tab}") as advanced:
                with gr.Row():
                    control("preset")
                    control("refine_power")
                with gr.Row():
                    control("region")
                    control("max_scale")
                with gr.Row():
                    control("levels")
                    control("hires", visible=not is_img2img)  # img2img has no hires fix
                with gr.Row(visible=False, elem_id=f"scfg_hires_row_{tab}") as hires_row:
                    control("hires_strength")
                    control("hires_min_rate")
                    control("hires_max_rate")
            pasted = gr.Checkbox(False, visible=False, elem_id=f"scfg_advanced_pasted_{tab}")
        by_name["hires"].change(lambda mode: gr.update(visible=mode == "own"), by_name["hires"], hires_row)
        pasted.change(lambda flag: (gr.update(open=True) if flag else gr.update(), False), pasted,
                      [advanced, pasted])
        by_name["levels"].focus(lambda: gr.update(choices=_level_choices()), None, by_name["levels"])
        self._picture = (picture, [by_name[n] for n in explain.INPUTS])
        self._wire_picture()
        self.infotext_fields = [(enabled, lambda d: "S-CFG" in d), (pasted, _advanced_pasted)]
        self.infotext_fields += [(by_name[f.name], infotext_key(f)) for f in FIELDS[1:]]
        self.paste_field_names = [infotext_key(f) for f in FIELDS]
        return [enabled, *(by_name[f.name] for f in FIELDS[1:])]

    def after_component(self, component, **kwargs):
        """The WebUI's CFG scale and sampling steps, for the live picture."""
        elem_id = kwargs.get("elem_id") or ""
        for name in ("cfg_scale", "steps"):
            if elem_id in (f"txt2img_{name}", f"img2img_{name}"):
                self.__dict__.setdefault("_webui", {})[name] = component
        self._wire_picture()

    def _wire_picture(self):
        """Redraw the picture when any of its inputs moves, once ours and the WebUI's exist."""
        webui, ours = self.__dict__.get("_webui", {}), self.__dict__.get("_picture")
        if ours is None or len(webui) < 2 or self.__dict__.get("_wired"):
            return
        self._wired = True
        picture, inputs = ours
        inputs = [*inputs, webui["cfg_scale"], webui["steps"]]
        for component in inputs:
            component.change(lambda *values: explain.picture(*values), inputs, picture,
                             show_progress=False)

    def setup(self, p, *args):
        """Called once for the ``p`` a generation creates, before X/Y/Z copies it: the copies share
        its close, so an exception inside any grid cell still tears down when the WebUI closes it."""
        _teardown_on_close(p)

    def process(self, p, *args):
        _teardown_on_close(p)
        _teardown(p)  # a previous generation that was never closed (a copy of p)
        # X/Y/Z shallow-copies p: each cell gets its own dict, so each keeps its own S-CFG values
        p.extra_generation_params = {k: v for k, v in p.extra_generation_params.items()
                                     if not str(k).startswith(INFOTEXT_PREFIX)}
        p._scfg = None
        seed = _first_seed(p)
        try:
            params = _params_for(p, args)
        except ScfgParamError as error:
            LAST.update(report=RunReport(host=HOST, enabled=False, seed=seed), error=str(error))
            log.error("S-CFG is off for this generation: %s", error)
            p.extra_generation_params["S-CFG error"] = str(error)
            _pending_notes(None)
            return
        LAST["error"] = None
        if not params.enabled:
            # generations run one at a time (the WebUI's queue): the status route names this one
            LAST["report"] = RunReport(host=HOST, enabled=False, seed=seed)
            _pending_notes(None)
            return
        recorded = _preview_steps() if params.show_maps else int(params.overlay)  # the last step at least
        report = RunReport(host=HOST, preview_steps=recorded, seed=seed, raw_maps=params.raw_maps)
        p._scfg = (params, report)
        _pending_notes(report)
        p.extra_generation_params.update(to_infotext(params))

    def process_before_every_sampling(self, p, *args, **kwargs):
        _teardown(p)
        state = getattr(p, "_scfg", None)
        if state is None:
            return
        params, report = state
        report.phase = "hires" if getattr(p, "is_hr_pass", False) else ""
        if getattr(p, "is_hr_pass", False):
            params = params.for_hires()
            if params is None:
                return
        reason = HOOKS.unsupported_reason(p)
        if reason:
            report.note(reason)
            return
        try:
            HOOKS.setup(p, params, report)
        except Exception as error:  # never break the user's generation
            _teardown(p)
            report.fallback(f"setup failed: {error}", warn=True, exc=error)

    def postprocess_batch(self, p, *args, **kwargs):
        _teardown(p)
        state = getattr(p, "_scfg", None)
        if state is not None:  # before the batch's infotexts are written; a plain string (JSON-safe)
            _finish(p, state[1])

    def postprocess(self, p, processed, *args):
        _teardown(p)
        state = getattr(p, "_scfg", None)
        if state is not None:
            _finish(p, state[1])
        if state is None or not state[1].previews or not processed.images:
            return  # ADetailer's dummy Processed has no images
        params, report = state
        if getattr(p, "is_api", False) and not params.api_previews:
            return  # API clients that expect N images get N
        try:
            _add_previews(p, processed, report, params)
        except Exception as error:  # a preview must never cost the user their images
            log.debug("S-CFG preview failure", exc_info=True)
            report.note(f"could not draw the previews: {error}")


def _first_seed(p) -> int | None:
    seeds = getattr(p, "all_seeds", None) or [getattr(p, "seed", None)]
    try:
        return int(seeds[0])
    except (TypeError, ValueError):
        return None


def _finish(p, report) -> None:
    """The run's warning into the infotext, and the run as the status route's last one: a nested
    run (ADetailer's, inside the outer one's postprocessing) finishes first, the outer one last."""
    warning = report.warning_text()
    if warning:
        p.extra_generation_params["S-CFG warning"] = warning
    else:
        p.extra_generation_params.pop("S-CFG warning", None)
    LAST["report"] = report


def _teardown(p) -> None:
    """Remove S-CFG's hooks; a failure there is one warning per run, never an error in the WebUI.
    The adapters restore the host's state in ``finally`` blocks, so nothing stays installed."""
    try:
        HOOKS.teardown()
    except Exception as error:
        text = f"teardown failed: {error}"
        state = getattr(p, "_scfg", None)
        if state is not None:
            state[1].note(text)
        else:  # before this generation's report exists: it reports it when made, or the log now
            PENDING.append(text)


def _pending_notes(report) -> None:
    while PENDING:
        text = PENDING.pop(0)
        if report is not None:
            report.note(text)
        else:
            log.warning("S-CFG: %s", text)


def _teardown_on_close(p):
    """Remove the hooks even when sampling raised: neither WebUI has an on-error callback for
    scripts, but both run every generation inside ``with closing(p)`` (UI and API alike).
    Wrapped once per ``p``: the img2img batch tab reuses one ``p`` for every image."""
    close = p.close
    if getattr(close, "_scfg", False):
        return

    def close_and_teardown():
        _teardown(p)
        state = getattr(p, "_scfg", None)
        if state is not None:
            LAST["report"] = state[1]
        return close()

    close_and_teardown._scfg = True
    p.close = close_and_teardown


def _preview_steps() -> int:
    from modules import shared

    return int(getattr(shared.opts, "scfg_preview_steps", 4))


def _add_previews(p, processed, report, params):
    """Insert each image's previews right after it, each with its own infotext line (the lists stay
    aligned): the regions over the image itself, then the panel of maps."""
    if params.test_fault == "preview":
        raise RuntimeError("injected test fault in preview")
    from modules import images, shared

    for image in sorted({key[0] for key in report.previews}, reverse=True):
        position = processed.index_of_first_image + image
        if not 0 <= position < len(processed.images):
            continue
        prompt = p.all_prompts[image] if image < len(p.all_prompts) else ""
        shown, overlays, panels = processed.images[position], [], []
        for sub, text in enumerate(split_and(prompt)):
            steps = report.preview_shots((image, sub))
            if not steps:
                continue
            tokens = HOOKS.prompt_tokens(p, text)
            if params.overlay:  # the last recorded step, the one whose x0 the image is
                overlays.append(overlay(shown, steps[-1], tokens))
            if params.show_maps:
                title = f"S-CFG, image {image + 1}, prompt {sub + 1}: {text[:70]}"
                panels.append(render(steps, tokens, title))
        made = []
        if overlays:
            made.append((_stack(overlays), f"S-CFG regions over image {image + 1}", "-scfg-regions"))
        if panels:
            info = f"S-CFG preview of image {image + 1} (regions, foreground, rate map)"
            made.append((_stack(panels), info, "-scfg"))
        for offset, (preview, info, suffix) in enumerate(made, start=1):
            processed.images.insert(position + offset, preview)
            processed.infotexts.insert(position + offset, info)
            if getattr(shared.opts, "scfg_save_previews", False):
                images.save_image(preview, p.outpath_samples, "", p.all_seeds[image], prompt,
                                  shared.opts.samples_format, info=info, p=p, suffix=suffix)


def _stack(panels):
    """AND sub-prompts: their previews one under the other."""
    from PIL import Image

    out = Image.new("RGB", (max(i.width for i in panels), sum(i.height for i in panels)), (24, 24, 24))
    y = 0
    for panel in panels:
        out.paste(panel, (0, y))
        y += panel.height
    return out


def _add_xyz_axes():
    """Our X/Y/Z plot axes: enable and every numeric or choice control (the Dynamic Thresholding way)."""
    xyz = next((d.module for d in scripts.scripts_data
                if d.script_class.__module__ in ("xyz_grid.py", "scripts.xyz_grid")), None)
    if xyz is None or any(o.label.startswith("[S-CFG]") for o in xyz.axis_options):
        return
    apply_field, boolean_choice = _xyz_helpers(xyz)
    options = [xyz.AxisOption("[S-CFG] Enabled", str, apply_field("scfg_enabled"),
                              choices=boolean_choice(reverse=True))]
    for field in FIELDS[1:]:
        if isinstance(field.default, bool) or field.name == "levels":
            continue
        label = f"[S-CFG] {field.name.replace('_', ' ').capitalize()}"
        apply = apply_field(f"scfg_{field.name}")
        if field.choices is not None:
            options.append(xyz.AxisOption(label, str, apply, choices=lambda f=field: list(f.choices)))
        else:
            options.append(xyz.AxisOption(label, type(field.default), apply))
    xyz.axis_options.extend(options)


def _xyz_helpers(xyz):
    """apply_field and boolean_choice: in the script module (A1111, Forge, reForge), or in the
    built-in xyz extension's lib_xyz package (Forge Classic, Neo 2026)."""
    apply_field, boolean_choice = getattr(xyz, "apply_field", None), getattr(xyz, "boolean_choice", None)
    try:
        if apply_field is None:
            from lib_xyz.axis_application import apply_field
        if boolean_choice is None:
            from lib_xyz.utils import boolean_choice
    except ImportError:  # a host that moves them again: A1111's two small helpers, as Neo's own built-ins do
        apply_field, boolean_choice = apply_field or _apply_field, boolean_choice or _boolean_choice
    return apply_field, boolean_choice


def _apply_field(field):
    def apply(p, x, xs):
        setattr(p, field, x)
    return apply


def _boolean_choice(reverse: bool = False):
    return lambda: ["False", "True"] if reverse else ["True", "False"]


def _on_app_started(demo, app):
    """GET /scfg/v1/status, and a 422 for S-CFG API args out of range before any sampling starts."""
    app.add_api_route("/scfg/v1/status", lambda: status_payload(HOST, HOOKS.installed(), LAST, HOST_NAME),
                      methods=["GET"])
    ApiArgsCheck.install(app)  # nothing to wrap without --api


def _on_ui_settings():
    from modules import shared

    section = ("scfg", "S-CFG")
    for name in SETTINGS_DEFAULTS:
        field = FIELD_BY_NAME[name]
        option = shared.OptionInfo(field.default, f"Default {LABELS[name].lower()}", gr.Slider,
                                   {"minimum": field.low, "maximum": field.high, "step": 0.05},
                                   section=section)
        shared.opts.add_option(f"scfg_default_{name}", _needs_reload(option))
    shared.opts.add_option("scfg_preview_steps", shared.OptionInfo(
        4, "Steps shown in each S-CFG preview", gr.Slider, {"minimum": 1, "maximum": 12, "step": 1},
        section=section))
    shared.opts.add_option("scfg_save_previews", shared.OptionInfo(
        False, "Save S-CFG previews beside the images (file name suffix -scfg)", section=section))


def _needs_reload(option):
    """The defaults apply when the UI is built: say so on the Settings page where the host can."""
    return option.needs_reload_ui() if hasattr(option, "needs_reload_ui") else option


def _on_infotext_pasted(infotext, params):
    """Pasting an S-CFG infotext that lacks some keys (older versions) restores their defaults, and
    one whose S-CFG values are garbled restores the defaults of those keys, with a warning."""
    if "S-CFG" not in params:
        return
    for key, name in OLD_INFOTEXT_KEYS.items():  # images made before a parameter was renamed
        if key in params:
            params.setdefault(infotext_key(FIELD_BY_NAME[name]), params[key])
    clean, problems = sanitize_infotext(params)
    params.update(clean)
    for problem in problems:
        log.warning("S-CFG: pasted infotext: %s", problem)
    for field in FIELDS[1:]:
        params.setdefault(infotext_key(field), str(FIELD_BY_NAME[field.name].default))


script_callbacks.on_before_ui(_add_xyz_axes)
script_callbacks.on_app_started(_on_app_started)
script_callbacks.on_infotext_pasted(_on_infotext_pasted)
script_callbacks.on_ui_settings(_on_ui_settings)

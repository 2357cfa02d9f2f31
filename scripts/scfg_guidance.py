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
    from_script_args,
    make_params,
    to_infotext,
)
from scfg_ext.hosts import adapter, detect_host, host_name
from scfg_ext.params import (
    FIELD_BY_NAME,
    INFOTEXT_PREFIX,
    OLD_INFOTEXT_KEYS,
    infotext_key,
    sanitize_infotext,
)
from scfg_ext.preview import render, split_and
from scfg_ext.report import RunReport
from scfg_ext.webapi import ApiArgsCheck, status_payload

log = logging.getLogger("scfg")
HOST = detect_host()
HOST_NAME = host_name(HOST)
HOOKS = adapter(HOST)
LAST = {"report": RunReport(host=HOST), "error": None}

TIPS = {
    "strength": "0 = plain CFG, 1 = the paper's per-region scales, above 1 exaggerates the differences.",
    "preset": "official: the authors' code ((S+3S²)/4, smoothing). paper: eq. 9, 10 and 14 as printed.",
    "refine_power": "R, the number of self-attention powers averaged in the paper preset (eq. 10).",
    "region": "Benchmark region of eq. 13: the foreground (eq. 14) or the whole image (S-CFG-mean).",
    "min_rate": "Lowest per-region scale, as a multiple of the CFG scale.",
    "max_rate": "Highest per-region scale, as a multiple of the CFG scale.",
    "max_scale": "Cap on the effective CFG scale of any pixel (the authors use 15).",
    "start": "S-CFG acts from this fraction of the sampling steps on.",
    "end": "S-CFG acts up to this fraction of the sampling steps.",
    "levels": "auto (two smallest attention resolutions; latent/4 on SDXL) or downsample factors, e.g. 4,8.",
    "hires": "Hires-fix pass: same values, off, or the hires values below.",
    "hires_strength": "Strength in the hires-fix pass (when hires is 'own').",
    "hires_min_rate": "Min rate in the hires-fix pass (when hires is 'own').",
    "hires_max_rate": "Max rate in the hires-fix pass (when hires is 'own').",
    "show_maps": "Add a preview of the token regions, foreground and rate map after each image.",
}


def _component(field, tab):
    """One gradio control for a parameter field (the portable gradio 3/4 subset)."""
    elem_id = f"scfg_{field.name}_{tab}"
    label, info = field.name.replace("_", " ").capitalize(), TIPS.get(field.name)
    if field.choices is not None:
        return gr.Radio(choices=list(field.choices), value=field.default, label=label, info=info,
                        elem_id=elem_id)
    if isinstance(field.default, bool):
        return gr.Checkbox(value=field.default, label=label, info=info, elem_id=elem_id)
    if field.low is not None:
        step = 1 if isinstance(field.default, int) else 0.05
        return gr.Slider(minimum=field.low, maximum=field.high, step=step, value=field.default,
                         label=label, info=info, elem_id=elem_id)
    return gr.Textbox(value=str(field.default), label=label, info=info, elem_id=elem_id)


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
        controls = []
        with InputAccordion(False, label="S-CFG", elem_id=f"scfg_{tab}") as enabled:
            gr.HTML(f'<p class="scfg-note">Semantic-aware CFG (Shen et al., CVPR 2024) '
                    f'v{__version__} on {HOST_NAME}, for SD1.x, SD2.x and SDXL UNets (not DiT models '
                    f'such as Flux yet).</p>')
            by_name = {}
            for field in FIELDS[1:]:
                by_name[field.name] = _component(field, tab)
                controls.append(by_name[field.name])
        self.infotext_fields = [(enabled, lambda d: "S-CFG" in d)]
        self.infotext_fields += [(by_name[f.name], infotext_key(f)) for f in FIELDS[1:]]
        self.paste_field_names = [infotext_key(f) for f in FIELDS]
        return [enabled, *controls]

    def setup(self, p, *args):
        """Called once for the ``p`` a generation creates, before X/Y/Z copies it: the copies share
        its close, so an exception inside any grid cell still tears down when the WebUI closes it."""
        _teardown_on_close(p)

    def process(self, p, *args):
        _teardown_on_close(p)
        HOOKS.teardown()  # a previous generation that was never closed (a copy of p)
        # X/Y/Z shallow-copies p: each cell gets its own dict, so each keeps its own S-CFG values
        p.extra_generation_params = {k: v for k, v in p.extra_generation_params.items()
                                     if not str(k).startswith(INFOTEXT_PREFIX)}
        p._scfg = None
        try:
            params = _params_for(p, args)
        except ScfgParamError as error:
            LAST["error"] = str(error)
            log.error("S-CFG is off for this generation: %s", error)
            p.extra_generation_params["S-CFG error"] = str(error)
            return
        LAST["error"] = None
        if not params.enabled:
            return
        report = RunReport(host=HOST, preview_steps=_preview_steps() if params.show_maps else 0)
        p._scfg = (params, report)
        p.extra_generation_params.update(to_infotext(params))

    def process_before_every_sampling(self, p, *args, **kwargs):
        HOOKS.teardown()
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
            HOOKS.teardown()
            report.fallback(f"setup failed: {error}", warn=True, exc=error)

    def postprocess_batch(self, p, *args, **kwargs):
        HOOKS.teardown()
        state = getattr(p, "_scfg", None)
        if state is not None:  # before the batch's infotexts are written; a plain string (JSON-safe)
            _finish(p, state[1])

    def postprocess(self, p, processed, *args):
        HOOKS.teardown()
        state = getattr(p, "_scfg", None)
        if state is not None:
            _finish(p, state[1])
        if state is None or not state[1].previews or not processed.images:
            return  # ADetailer's dummy Processed has no images
        params, report = state
        if getattr(p, "is_api", False) and not params.api_previews:
            return  # API clients that expect N images get N
        try:
            _add_previews(p, processed, report)
        except Exception as error:  # a preview must never cost the user their images
            log.warning("S-CFG: could not draw the previews: %s", error, exc_info=True)


def _finish(p, report) -> None:
    """The run's warning into the infotext, and the run as the status route's last one: a nested
    run (ADetailer's, inside the outer one's postprocessing) finishes first, the outer one last."""
    warning = report.warning_text()
    if warning:
        p.extra_generation_params["S-CFG warning"] = warning
    else:
        p.extra_generation_params.pop("S-CFG warning", None)
    LAST["report"] = report


def _teardown_on_close(p):
    """Remove the hooks even when sampling raised: neither WebUI has an on-error callback for
    scripts, but both run every generation inside ``with closing(p)`` (UI and API alike).
    Wrapped once per ``p``: the img2img batch tab reuses one ``p`` for every image."""
    close = p.close
    if getattr(close, "_scfg", False):
        return

    def close_and_teardown():
        HOOKS.teardown()
        state = getattr(p, "_scfg", None)
        if state is not None:
            LAST["report"] = state[1]
        return close()

    close_and_teardown._scfg = True
    p.close = close_and_teardown


def _preview_steps() -> int:
    from modules import shared

    return int(getattr(shared.opts, "scfg_preview_steps", 4))


def _add_previews(p, processed, report):
    """Insert each image's preview right after it, with its own infotext line (lists stay aligned)."""
    from modules import images, shared

    for image in sorted({key[0] for key in report.previews}, reverse=True):
        position = processed.index_of_first_image + image
        if not 0 <= position < len(processed.images):
            continue
        prompt = p.all_prompts[image] if image < len(p.all_prompts) else ""
        panels = []
        for sub, text in enumerate(split_and(prompt)):
            steps = report.previews.get((image, sub))
            if steps:
                title = f"S-CFG, image {image + 1}, prompt {sub + 1}: {text[:70]}"
                panels.append(render(steps, HOOKS.prompt_tokens(p, text), title))
        if not panels:
            continue
        preview = _stack(panels)
        info = f"S-CFG preview of image {image + 1} (regions, foreground, rate map)"
        processed.images.insert(position + 1, preview)
        processed.infotexts.insert(position + 1, info)
        if getattr(shared.opts, "scfg_save_previews", False):
            images.save_image(preview, p.outpath_samples, "", p.all_seeds[image], prompt,
                              shared.opts.samples_format, info=info, p=p, suffix="-scfg")


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
    if apply_field is None:
        from lib_xyz.axis_application import apply_field
    if boolean_choice is None:
        from lib_xyz.utils import boolean_choice
    return apply_field, boolean_choice


def _on_app_started(demo, app):
    """GET /scfg/v1/status, and a 422 for S-CFG API args out of range before any sampling starts."""
    app.add_api_route("/scfg/v1/status", lambda: status_payload(HOST, HOOKS.installed(), LAST, HOST_NAME),
                      methods=["GET"])
    ApiArgsCheck.install(app)  # nothing to wrap without --api


def _on_ui_settings():
    from modules import shared

    section = ("scfg", "S-CFG")
    shared.opts.add_option("scfg_preview_steps", shared.OptionInfo(
        4, "Steps shown in each S-CFG preview", gr.Slider, {"minimum": 1, "maximum": 12, "step": 1},
        section=section))
    shared.opts.add_option("scfg_save_previews", shared.OptionInfo(
        False, "Save S-CFG previews beside the images (file name suffix -scfg)", section=section))


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

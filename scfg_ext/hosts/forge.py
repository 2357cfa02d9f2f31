"""WebUI Forge (backend/ UNet patcher): Forge's hooks translated into ``scfg_ext`` core calls.

Per sampling pass, ``setup`` clones ``p.sd_model.forge_objects.unet`` and patches the clone only:

* attn1/attn2 **replace** patches on the transformer blocks of the selected levels. Each returns
  the normal output (the replace patch already there, e.g. IP-Adapter, Reference or SAG, else the
  host's default attention) and, while the step's capture window is open, hands its q/k to the
  core's ``StepCapture``. They sit on ``(block, id)`` keys, plus the exact ``(block, id, index)``
  key wherever one was already taken (which would otherwise shadow ours). Not claiming 3-tuple
  keys of our own keeps per-pass 2-tuple patches of later extensions working: PAG puts its
  perturbed attn1 on ``("middle", 0)`` for its extra pass, which SD1.x's 8x8 level uses.
* a conditioning modifier arms the step with its latent, and a pre-cfg function opens the window
  just before the step's UNet batch when the layout is one S-CFG understands. It closes once every
  cond/uncond chunk has been through the last patched block, so the extra UNet passes of PAG and
  SAG are never captured. With AND sub-prompts a forward hook on the diffusion model keeps each
  sub-prompt's own prediction (Forge averages them before CFG), so each gets its own rates.
* the combination, see ``_Run.combine_post`` and ``_Run.combine_chained``.
* a CFG-denoiser callback follows the model when the refiner switch reloads it mid-pass.

Any exception inside a step gives plain CFG for that step and one warning (``RunReport``).
State lives in closures (deep-copying ``model_options``, as every ``clone()`` does, shares them).
The host's module paths are in ``BACKEND``, so that ``ldm_patched`` hosts reuse all of this.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from ..attention import peak_bytes
from ..guidance import prescale_cond
from ..levels import level_of_tokens, level_size, mask_grid_for
from ..params import ScfgParams
from ..report import RunReport
from ..segment import Geometry
from ..step import CaptureError, Pair, StepCapture
from . import common

COND, UNCOND = 0, 1
_BYPASS_KEYS = ("area", "mask", "timestep_start", "timestep_end")
_current = None  # the _Run of the last setup, until teardown


def _backend_attention():
    from backend import attention

    return attention.attention_function


def _backend_cond_equal_size():
    from backend.sampling.sampling_function import cond_equal_size

    return cond_equal_size


def _backend_upcast() -> bool:
    try:
        from backend import attention

        return attention.get_attn_precision() == torch.float32
    except Exception:  # an older or newer backend without it: Forge's default upcasts
        return True


def _backend_unet_class():
    from backend.nn.unet import IntegratedUNet2DConditionModel

    return IntegratedUNet2DConditionModel


def _backend_to_x0(model):
    """The host's conversion of a raw UNet output to x0 (ε, v, EDM, flow alike)."""
    return model.predictor.calculate_denoised


# Forge 2 (backend/): Forge main, Neo. The ldm_patched adapter (reForge, Forge Classic) swaps these.
# pre_cfg_before_unet: sampler_pre_cfg_function(model, cond, uncond, x, timestep, model_options) runs
# just before the UNet batch (old Forge/ComfyUI form); where it is the newer fn(args) run after the
# UNet (reForge), the step starts in the conditioning modifier instead.
BACKEND = SimpleNamespace(attention=_backend_attention, cond_equal_size=_backend_cond_equal_size,
                          upcast=_backend_upcast, unet_class=_backend_unet_class, to_x0=_backend_to_x0,
                          pre_cfg_before_unet=True, name="forge")


def unsupported_reason(p) -> str | None:
    """None for SD1.x, SD2.x and SDXL UNets; otherwise why S-CFG does not apply."""
    model = getattr(p, "sd_model", None)
    if not hasattr(model, "forge_objects"):
        return "S-CFG needs a Forge model with forge_objects"
    if not any(getattr(model, flag, False) for flag in ("is_sd1", "is_sd2", "is_sdxl")):
        return (f"S-CFG does not apply to {type(model).__name__} (Flux, Chroma, SD3 and other DiT "
                "models): it needs the cross-attention UNet of SD1.x, SD2.x or SDXL")
    if not isinstance(model.forge_objects.unet.model.diffusion_model, BACKEND.unet_class()):
        return "S-CFG does not apply: this model's diffusion model is not Forge's UNet"
    return None


def prompt_tokens(p, text: str) -> list[str | None]:
    """The CLIP pieces of ``text`` per context position, as Forge's text engine chunks it (SDXL: CLIP-L)."""
    model = p.sd_model
    return common.prompt_tokens(getattr(model, "text_processing_engine", None)
                                or model.text_processing_engine_l, text)


def setup(p, params: ScfgParams, report: RunReport) -> None:
    """Patch a clone of this pass's UNet and make it the pass's UNet (idempotent)."""
    global _current
    teardown()
    _ensure_callback()
    model = p.sd_model
    unet = _clone(model.forge_objects.unet, report)
    sites, factors, present = common.selected_sites(unet.model.diffusion_model, params.level_factors())
    if not sites:
        report.note(f"S-CFG levels '{params.levels}' do not exist in this model "
                    f"(attention at latent/{present}); S-CFG is off")
        return
    run = _Run(p, params, report, {s.key: s.factor for s in sites}, factors)
    run.install(unet)
    _current = (model, model.forge_objects.unet, unet, run)
    model.forge_objects.unet = unet
    if params.test_fault == "setup":
        raise RuntimeError("injected test fault in setup")


# What a clone must carry over: other extensions' patches (PAG, Dynamic Thresholding, RescaleCFG...)
# and weight patches (LoRA). One stored 2026 Neo patcher/unet.py rebuilds the patcher in clone()
# without copying them.
_CARRIED = ("model_options", "patches", "object_patches", "patches_uuid")


def _clone(unet, report: RunReport):
    """``unet.clone()``, with what the host's clone dropped (see _CARRIED) copied back, and a note."""
    clone = unet.clone()
    dropped = [name for name in _CARRIED
               if getattr(unet, name, None) and not getattr(clone, name, None)]
    for name in dropped:
        value = getattr(unet, name)
        setattr(clone, name, copy.deepcopy(value) if name == "model_options" else copy.copy(value))
    if dropped:
        report.note(f"the host's UNet clone dropped {', '.join(dropped)}: copied back")
    return clone


def teardown() -> None:
    """Deactivate the last run and give its model back the UNet it had before ``setup``."""
    global _current
    if _current is None:
        return
    model, original, patched, run = _current
    _current = None
    try:
        run.close()
        if run.params.test_fault == "teardown":
            raise RuntimeError("injected test fault in teardown")
    finally:  # a model the host has unloaded meanwhile (Neo's refiner switch) has no forge_objects
        objects = getattr(model, "forge_objects", None)
        if getattr(objects, "unet", None) is patched:
            objects.unet = original


def installed() -> list[str]:
    """The hooks of the active run, e.g. ["attn1 input.7", ..., "sampler_post_cfg_function"]."""
    return [] if _current is None else list(_current[3].hooks)


def on_cfg_denoiser(params) -> None:
    """Follow a model reload mid-pass (the refiner switch, sd_samplers_common.apply_refiner): the
    new model's UNet has none of our patches, so patch it as ``setup`` did the first one."""
    if _current is None:
        return
    run = _current[3]
    denoiser = getattr(params, "denoiser", None)
    if getattr(denoiser, "p", None) is not run.p:
        return
    try:
        if not run.serves(run.p.sd_model.forge_objects.unet):
            setup(run.p, run.params, run.report)
    except Exception as error:
        run.report.fallback(f"S-CFG could not follow the model switch: {error}", warn=True, exc=error)


def _ensure_callback() -> None:
    try:
        from modules import script_callbacks
    except ImportError:  # unit tests without a WebUI
        return
    registered = script_callbacks.callback_map.get("callbacks_cfg_denoiser", [])
    if not any(getattr(c, "callback", None) is on_cfg_denoiser for c in registered):
        try:
            script_callbacks.on_cfg_denoiser(on_cfg_denoiser, name="scfg")
        except TypeError:  # registries without names (Forge Classic)
            script_callbacks.on_cfg_denoiser(on_cfg_denoiser)


def _cond_order(cond, uncond) -> list[int]:
    """Which AND sub-prompt each cond chunk is, in the order Forge's UNet calls see them.

    calc_cond_uncond_batch takes the entries that concatenate with the first one left, highest index
    first, and a memory split only cuts that run into several calls, so the order never depends on it.
    """
    cond_equal_size = BACKEND.cond_equal_size()
    entries = [c["model_conds"] for c in [*cond, *uncond]]
    left, order = list(range(len(entries))), []
    while left:
        group = [i for i in left if cond_equal_size(entries[i], entries[left[0]])]
        order += group[::-1]
        left = [i for i in left if i not in group]
    return [i for i in order if i < len(cond)]


def _ours(fn) -> bool:
    return getattr(fn, "_scfg", False)


def _unwrap(fn):
    """What a patch of an earlier S-CFG install wrapped (so re-installing never stacks ours)."""
    while fn is not None and _ours(fn):
        fn = fn._scfg_prev
    return fn


def _hook(fn, run, prev=None):
    """A plain function calling ``fn``, marked as ours: deep copies of model_options share it."""
    def hook(*args):
        return fn(*args)

    hook._scfg, hook._scfg_prev, hook._scfg_run = True, prev, run
    return hook


@dataclass
class _Step:
    """One sampling step of a pass: its layout, its capture and what its UNet calls showed."""
    capture: StepCapture | None
    skip: tuple | None = None  # (reason, warn, error): this step is plain CFG
    at: tuple | None = None    # (0-based step, steps) for previews
    batch: int = 0
    conds: int = 0
    order: list = field(default_factory=list)    # AND sub-prompt of each cond chunk, in UNet order
    weights: list = field(default_factory=list)  # AND strengths
    chunks: int = 0     # cond/uncond chunks through the last patched block
    cond_seen: int = 0  # of which cond
    outputs: dict = field(default_factory=dict)  # AND sub-prompt -> its own UNet output [B, C, H, W]
    stored: int = 0     # chunks whose outputs were kept

    @property
    def open(self) -> bool:
        return self.capture is not None and self.chunks < self.conds + 1


class _Run:
    """One sampling pass: the installed hooks and the current step."""

    def __init__(self, p, params: ScfgParams, report: RunReport, keys: dict, factors: tuple[int, ...]):
        self.p, self.params, self.report = p, params, report
        self.keys, self.factors = keys, factors
        self.last_key = max(keys, key=lambda k: (("input", "middle", "output").index(k[0]), k[1], k[2]))
        self.hooks: list[str] = []
        self.patches: set = set()  # our attention patches, to check every step that they still apply
        self.chained = None  # the cfg function we chain, or None for the post-cfg correction
        self.active, self.armed, self.step = True, None, None
        self.geometry, self.upcast = Geometry(), BACKEND.upcast()  # per pass, not per step

    # ----- installation -----------------------------------------------------------------
    def install(self, unet) -> None:
        options = unet.model_options
        for option in ("conditioning_modifiers", "sampler_pre_cfg_function", "sampler_post_cfg_function"):
            if option in options:  # an earlier install on this same UNet: drop its entries
                options[option] = [f for f in options[option] if not _ours(f)]
        existing = options.get("transformer_options", {}).get("patches_replace", {})
        attention = BACKEND.attention()
        for name in ("attn1", "attn2"):
            taken = existing.get(name, {})
            blocks = sorted({k[:2] for k in self.keys})
            for key in blocks + [k for k in self.keys if k in taken]:
                patch = self._attention_patch(name, _unwrap(taken.get(key)), attention)
                unet.set_model_patch_replace(patch, name, *key)
                self.patches.add(patch)
                self.hooks.append(f"{name} {'.'.join(map(str, key))}")
        unet.add_conditioning_modifier(_hook(self.arm, self))
        if BACKEND.pre_cfg_before_unet:
            unet.add_sampler_pre_cfg_function(_hook(self.begin, self))
        prev = _unwrap(options.get("sampler_cfg_function"))
        if prev is not None:
            self.chained = _hook(lambda args: self.combine_chained(args, prev), self, prev)
            unet.set_model_sampler_cfg_function(self.chained)
            self.hooks.append("sampler_cfg_function (chained)")
        else:
            # first in the list, so that it sees Forge's own plain CFG result (see combine_post)
            options["sampler_post_cfg_function"] = [_hook(self.combine_post, self),
                                                    *options.get("sampler_post_cfg_function", [])]
            self.hooks.append("sampler_post_cfg_function")
        self.hooks += ["conditioning_modifier"] + (["sampler_pre_cfg_function"] if BACKEND.pre_cfg_before_unet
                                                   else [])
        dm = unet.model.diffusion_model
        self._outputs_hook = dm.register_forward_hook(self._on_unet_output, with_kwargs=True)
        self.hooks.append("diffusion_model output (AND prompts)")
        try:
            unet.add_extra_preserved_memory_during_sampling(self._reserve(unet))
        except (AttributeError, TypeError, ValueError):
            pass

    def serves(self, unet) -> bool:
        """Whether ``unet`` carries this run's hooks (it may be a later extension's clone of ours)."""
        return any(getattr(f, "_scfg_run", None) is self
                   for f in unet.model_options.get("conditioning_modifiers", []))

    def _attention_patch(self, name: str, prev, attention):
        observe = self.self_attention if name == "attn1" else self.cross_attention

        def patch(q, k, v, extra_options):
            if prev is not None:
                out = prev(q, k, v, extra_options)
            else:
                out = attention(q, k, v, extra_options["n_heads"])
            step = self.step
            if step is not None and step.open:
                observe(step, q, k, extra_options)
            return out

        patch._scfg, patch._scfg_prev = True, prev
        return patch

    def _reserve(self, unet) -> int:
        """VRAM for the largest selected level's refinement (core estimate), for Forge's planner."""
        p, dm = self.p, unet.model.diffusion_model
        width, height = (p.hr_upscale_to_x, p.hr_upscale_to_y) if getattr(p, "is_hr_pass", False) \
            else (p.width, p.height)
        h, w = level_size(height // 8, width // 8, min(self.factors))
        heads = max((m.heads for m in dm.modules() if type(m).__name__ == "CrossAttention"), default=8)
        return peak_bytes(2 * max(int(getattr(p, "batch_size", 1)), 1), h * w, heads, 4 * 77)

    def close(self) -> None:
        """Teardown: every hook of this run passes through from now on; drop references."""
        self.active = False
        self.step = self.armed = self.p = None
        hook, self._outputs_hook = getattr(self, "_outputs_hook", None), None
        if hook is not None:
            hook.remove()

    # ----- one step ---------------------------------------------------------------------
    def arm(self, model, x, timestep, uncond, cond, cond_scale, model_options, seed):
        """Conditioning modifier: the pre-cfg call on this same latent is the step's own. A nested
        ``sampling_function_inner`` run by a later modifier (Reference-only's recording pass, on a
        noised reference latent) is not."""
        if self.armed is not None:
            self.report.fallback("a step's own sampling call was not recognised (another extension "
                                 "replaced the latent before CFG)", warn=True)
        self.armed = (cond_scale, x) if self.active else None
        if self.active and not BACKEND.pre_cfg_before_unet:  # the UNet batch follows directly
            self.begin(model, cond, uncond, x, timestep, model_options)
        return model, x, timestep, uncond, cond, cond_scale, model_options, seed

    def _nested(self, x) -> bool:
        """A sampling call inside this step's conditioning modifiers, on another latent."""
        return self.armed is not None and x is not self.armed[1]

    def begin(self, model, cond, uncond, x, timestep, model_options):
        """Pre-cfg function: start the step, capturing if its layout is one S-CFG handles."""
        if self._nested(x):
            return model, cond, uncond, x, timestep, model_options
        scale, self.armed = (self.armed or (None, None))[0], None
        if scale is None:
            return model, cond, uncond, x, timestep, model_options
        self.step = _Step(None)
        try:
            self.step.skip = self._skip_reason(cond, uncond, scale, model_options)
            if self.step.skip is None:
                self.step = self._new_step(cond, uncond, x)
        except Exception as error:
            self.step = _Step(None, (f"S-CFG failed before the UNet: {error}", True, error))
        return model, cond, uncond, x, timestep, model_options

    def _new_step(self, cond, uncond, x) -> _Step:
        height, width = x.shape[-2:]
        capture = StepCapture(self.params, mask_grid_for(height, width, self.factors), len(self.keys),
                              upcast=self.upcast, geometry=self.geometry)
        denoiser = getattr(getattr(self.p, "sampler", None), "model_wrap_cfg", None)
        at = common.sampler_step(denoiser)[2:] if getattr(denoiser, "total_steps", None) else None
        return _Step(capture, None, at, x.shape[0], len(cond), _cond_order(cond, uncond),
                     [c.get("strength", 1) for c in cond])

    def _skip_reason(self, cond, uncond, scale, model_options):
        """(reason, warn, None) when this step must use plain CFG, else None."""
        if common.no_guidance(scale):
            return (common.NO_GUIDANCE, False, None)
        if uncond is None:
            return (common.NO_UNCOND, False, None)
        denoiser = getattr(getattr(self.p, "sampler", None), "model_wrap_cfg", None)
        if denoiser is not None and denoiser.total_steps:
            call, calls, _, _ = common.sampler_step(denoiser)
            if not self.params.active_at(call, calls):
                return (common.OUTSIDE_WINDOW, False, None)
        if len(uncond) != 1 or any(k in c for c in [*cond, *uncond] for k in _BYPASS_KEYS):
            return ("area, mask or timestep-range conditioning (regional prompts)", True, None)
        if "model_function_wrapper" in model_options:
            return ("a UNet function wrapper (e.g. MultiDiffusion) is active", True, None)
        replace = model_options.get("transformer_options", {}).get("patches_replace", {})
        for name in ("attn1", "attn2"):
            table = replace.get(name, {})
            for key in self.keys:  # Forge's lookup: the exact key, else (block, id)
                if table.get(key, table.get(key[:2])) not in self.patches:
                    return ("another extension replaced S-CFG's attention patches", True, None)
        if not self._combiner_in_place(model_options):
            return ("another extension changed the CFG function after S-CFG's setup", True, None)
        return None

    def _combiner_in_place(self, model_options) -> bool:
        """Our cfg function still in its slot, or the slot still empty and our post-cfg listed: a cfg
        function set after setup (Dynamic Thresholding enabled later) would clamp before our
        correction, or replace our chained one."""
        cfg_function = model_options.get("sampler_cfg_function")
        if self.chained is not None:
            return cfg_function is self.chained
        post = model_options.get("sampler_post_cfg_function", [])
        return cfg_function is None and any(getattr(f, "_scfg_run", None) is self for f in post)

    def _rows(self, step: _Step, extra_options, q) -> tuple[int, ...]:
        """Global row ids of this call: image i of AND sub-prompt j -> j*B + i, of the uncond -> J*B + i."""
        labels, batch = extra_options["cond_or_uncond"], step.batch
        if q.shape[0] != batch * len(labels):
            raise CaptureError(f"{q.shape[0]} attention rows for {len(labels)} chunks of {batch} images")
        rows, conds = [], step.cond_seen
        for label in labels:
            if label == COND:
                if conds >= step.conds:
                    raise CaptureError("more cond chunks than conds in one step")
                first, conds = step.order[conds] * batch, conds + 1
            else:
                first = step.conds * batch
            rows.extend(range(first, first + batch))
        return tuple(rows)

    def self_attention(self, step: _Step, q, k, extra_options) -> None:
        try:
            key = _key(extra_options)
            step.capture.self_attention(key, self._rows(step, extra_options, q), q, k,
                                        extra_options["n_heads"], None)
        except Exception as error:
            self._fail(step, error)

    def cross_attention(self, step: _Step, q, k, extra_options) -> None:
        try:
            key = _key(extra_options)
            height, width = extra_options["original_shape"][-2:]
            size = level_of_tokens(height, width, q.shape[1])
            if size is None:
                raise CaptureError(f"{q.shape[1]} tokens at {key} match no level of {height}x{width}")
            labels = extra_options["cond_or_uncond"]
            step.capture.cross_attention(key, self._rows(step, extra_options, q), q, k,
                                         extra_options["n_heads"], None, size)
            if key == self.last_key:  # this UNet call is done: count its chunks
                step.chunks += len(labels)
                step.cond_seen += labels.count(COND)
        except Exception as error:
            self._fail(step, error)

    def _on_unet_output(self, module, args, kwargs, output) -> None:
        """Keep each AND sub-prompt's own prediction (raw UNet output) while the window is open."""
        step = self.step
        # the attention of this call has counted its chunks already; a call after the window
        # closed (PAG's, SAG's extra pass) was never counted
        if step is None or step.capture is None or step.conds < 2 or step.stored >= step.chunks:
            return
        try:
            labels = kwargs["transformer_options"]["cond_or_uncond"]
            step.stored += len(labels)
            j = step.cond_seen - labels.count(COND)  # cond chunks counted before this call
            for label, chunk in zip(labels, output.chunk(len(labels)), strict=True):
                if label == COND:
                    step.outputs[step.order[j]] = chunk
                    j += 1
                else:
                    step.outputs[UNCOND_KEY] = chunk
        except Exception as error:
            self._fail(step, error)

    def _fail(self, step: _Step, error) -> None:
        step.capture = None
        step.skip = (f"S-CFG capture failed: {error}", True, error)

    def _rates(self, args, cond, uncond, scale_of):
        """(γ, per-sub-prompt x0 predictions, their weights w̄ⱼ, rates [J, B, 1, H, W]), or None for
        plain CFG (the reason is reported). ``scale_of()`` gives γ, asked only for a captured step."""
        step, self.step = self.step, None
        if step is None:
            return None
        if step.capture is None:
            if step.skip is not None:
                reason, warn, error = step.skip
                self.report.fallback(reason, warn=warn, exc=error)
            return None
        try:
            if step.chunks != step.conds + 1:
                raise CaptureError(f"saw {step.chunks} of {step.conds + 1} cond/uncond chunks")
            gamma = scale_of()
            if gamma is None:
                self.report.fallback("the CFG result before S-CFG is not Forge's plain CFG (another "
                                     "post-CFG function ran first)", warn=True)
                return None
            if common.no_guidance(gamma):
                self.report.fallback(common.NO_GUIDANCE)
                return None
            total = sum(float(w) for w in step.weights)
            weights = [float(w) / total for w in step.weights]  # as Forge averages the conds
            preds = self._sub_prompt_predictions(step, args, cond)
            results = [step.capture.result([Pair(j * step.batch + i, step.conds * step.batch + i,
                                                 gamma * abs(weights[j])) for i in range(step.batch)],
                                           preds[j], uncond) for j in range(step.conds)]
        except Exception as error:
            self.report.fallback(f"S-CFG failed: {error}", warn=True, exc=error)
            return None
        rates = torch.stack([result.rate for result in results])
        self.report.step_applied(rates)
        self._record(step, results, gamma, weights)
        return gamma, preds, weights, rates

    def _without_uncond(self, args) -> bool:
        """A step the host ran without its uncond pass although the modifier saw one (reForge's
        NGMS and skip-early CFG call sampling_function with uncond None): plain CFG, no warning."""
        if args.get("uncond", True) is not None and args.get("uncond_denoised", True) is not None:
            return False
        step, self.step = self.step, None
        if step is not None:
            reason, warn, error = step.skip if step.skip is not None else (common.NO_UNCOND, False, None)
            self.report.fallback(reason, warn=warn, exc=error)
        return True

    def _sub_prompt_predictions(self, step: _Step, args, cond) -> list[torch.Tensor]:
        """Each AND sub-prompt's x0 prediction; one sub-prompt's is Forge's own cond prediction."""
        if step.conds == 1:
            return [cond]
        if len(step.outputs) != step.conds + 1:
            raise CaptureError(f"kept {len(step.outputs)} of {step.conds + 1} UNet outputs")
        to_x0 = BACKEND.to_x0(args["model"])
        sigma, x = args["sigma"], args["input"]
        return [to_x0(sigma, step.outputs[j].float(), x).to(cond.dtype) for j in range(step.conds)]

    def _record(self, step: _Step, results, gamma: float, weights) -> None:
        """Previews (the report keeps nothing unless they are on); a failure costs only the preview."""
        if step.at is None:
            return
        try:
            for j, result in enumerate(results):
                rows = [(image, j) for image, _ in common.preview_rows(self.p, [1] * step.batch)]
                self.report.record(*step.at, result, rows, [gamma * abs(weights[j])] * step.batch)
        except Exception as error:
            self.report.note(f"S-CFG could not record a preview: {error}")

    def combine_post(self, args):
        """sampler_post_cfg_function, used when no sampler_cfg_function is set.

        First in the list, it receives Forge's own plain CFG, d = u + γ·e·(c̄ − u) (c̄: the AND
        sub-prompts' average, e: their strengths' sum where it is not 1). γ·e is read back from d
        (least squares per image; the post-cfg arguments carry no scale, and a conditioning
        modifier after ours may have changed it), checked, and the S-CFG terms replace the plain
        ones: d + γ·e·Σⱼ w̄ⱼ(rⱼ − 1)(cⱼ − u), which is exactly u + γ·e·Σⱼ w̄ⱼ·rⱼ·(cⱼ − u), eq. 12 per
        sub-prompt. r ≡ 1 returns d bit for bit. Additive terms later in the list (PAG's, SAG's)
        are independent of ours.
        """
        denoised = args["denoised"]
        if not self.active or self._nested(args["input"]):
            return denoised
        cond, uncond = args["cond_denoised"], args["uncond_denoised"]
        if self._without_uncond(args):
            return denoised
        found = self._rates(args, cond, uncond, lambda: _read_scale(denoised, cond, uncond))
        if found is None:
            return denoised
        gamma, preds, weights, rates = found
        correction = sum(w * (rate.float() - 1) * (pred.float() - uncond.float())
                         for w, pred, rate in zip(weights, preds, rates, strict=True))
        return torch.where((rates == 1).all(0), denoised, (denoised + gamma * correction).to(denoised.dtype))

    def combine_chained(self, args, prev):
        """sampler_cfg_function when one was already set (Forge's Dynamic Thresholding): chain it.

        The cond handed to it is u + Σⱼ w̄ⱼ·rⱼ·(cⱼ − u), so a linear combiner yields eq. 12 exactly and
        Dynamic Thresholding clamps the S-CFG-scaled guidance to its mimic range. A post-cfg
        correction would instead add γ·(r − 1)·(c − u) unclamped after the clamp, which at the high
        CFG that thresholding exists for (r is capped to 15/γ) would undo or overshoot it.
        """
        if not self.active or self._nested(args["input"]):
            return prev(args)
        x, cond, uncond = args["input"], args["cond_denoised"], args["uncond_denoised"]
        if self._without_uncond(args):
            return prev(args)
        found = self._rates(args, cond, uncond, lambda: float(args["cond_scale"]))
        if found is None:
            return prev(args)
        _, preds, weights, rates = found
        if len(preds) == 1:
            scaled = prescale_cond(cond, uncond, rates[0])
        else:
            scaled = (uncond.float() + sum(w * rate.float() * (pred.float() - uncond.float())
                                           for w, pred, rate in zip(weights, preds, rates, strict=True)))
            scaled = scaled.to(cond.dtype)
        return prev({**args, "cond": x - scaled, "cond_denoised": scaled})


UNCOND_KEY = "uncond"


def _key(extra_options):
    block = extra_options["block"]
    return block[0], block[1], extra_options.get("block_index", 0)


def _read_scale(denoised, cond, uncond, rtol: float = 1e-3) -> float | None:
    """γ·e of d = u + γ·e·(c − u), by least squares; None where d is not of that form."""
    guidance = (cond.float() - uncond.float()).flatten(1)
    delta = (denoised.float() - uncond.float()).flatten(1)
    energy = (guidance * guidance).sum(1)
    if not bool((energy > 0).all()):
        return None
    scales = (delta * guidance).sum(1) / energy
    gamma = float(scales.mean())
    residual = float((delta - gamma * guidance).abs().amax())
    if not math.isfinite(gamma) or residual > rtol * max(float((gamma * guidance).abs().amax()), 1e-12):
        return None
    return gamma

"""WebUI Forge (backend/ UNet patcher): Forge's hooks translated into ``scfg_ext`` core calls.

Per sampling pass, ``setup`` clones ``p.sd_model.forge_objects.unet`` and patches the clone only:

* attn1/attn2 **replace** patches on the transformer blocks of the selected levels. Each returns
  the normal output (the replace patch already there, e.g. IP-Adapter, Reference or SAG, else
  ``backend.attention.attention_function``) and, while the step's capture window is open, hands
  its q/k to the core's ``StepCapture``. They sit on ``(block, id)`` keys, plus the exact
  ``(block, id, index)`` key wherever one was already taken (which would otherwise shadow ours).
  Not claiming 3-tuple keys of our own keeps per-pass 2-tuple patches of later extensions working:
  PAG puts its perturbed attn1 on ``("middle", 0)`` for its extra pass, which SD1.x's 8x8 level uses.
* a conditioning modifier (it alone sees the step's final CFG scale, after hires CFG, NGMS and
  "Skip Early CFG") arms the window, and a pre-cfg function opens it just before the step's UNet
  batch when the layout is one S-CFG understands. It closes once every cond/uncond chunk has been
  through the last patched block, so the extra UNet passes of PAG and SAG are never captured.
* the combination, see ``_Run.combine_post`` and ``_Run.combine_chained``.

Any exception inside a step gives plain CFG for that step and one warning (``RunReport``).
State lives in closures (deep-copying ``model_options``, as every ``clone()`` does, shares them).
"""

from __future__ import annotations

import math

import torch

from ..attention import grid_factor, peak_bytes
from ..guidance import correction, mix_rates, prescale_cond
from ..levels import level_size, mask_grid_for, select_levels
from ..params import ScfgParams
from ..report import RunReport
from ..step import CaptureError, Pair, StepCapture

COND, UNCOND = 0, 1
_BYPASS_KEYS = ("area", "mask", "timestep_start", "timestep_end")
_current = None  # the _Run of the last setup, until teardown


def unsupported_reason(p) -> str | None:
    """None for SD1.x, SD2.x and SDXL UNets; otherwise why S-CFG does not apply."""
    model = getattr(p, "sd_model", None)
    if not hasattr(model, "forge_objects"):
        return "S-CFG needs a Forge model with forge_objects"
    if not any(getattr(model, flag, False) for flag in ("is_sd1", "is_sd2", "is_sdxl")):
        return (f"S-CFG does not apply to {type(model).__name__} (Flux, Chroma, SD3): it needs the "
                "cross-attention UNet of SD1.x, SD2.x or SDXL")
    from backend.nn.unet import IntegratedUNet2DConditionModel

    if not isinstance(model.forge_objects.unet.model.diffusion_model, IntegratedUNet2DConditionModel):
        return "S-CFG does not apply: this model's diffusion model is not Forge's UNet"
    return None


def prompt_tokens(p, text: str) -> list[str | None]:
    """The CLIP pieces of ``text`` per context position, as Forge's text engine chunks it (SDXL: CLIP-L)."""
    model = p.sd_model
    engine = getattr(model, "text_processing_engine", None) or model.text_processing_engine_l
    chunks, _ = engine.tokenize_line(text)
    ids = [t for chunk in chunks for t in chunk.tokens]
    special = {engine.id_start, engine.id_end, engine.id_pad}
    pieces = engine.tokenizer.convert_ids_to_tokens(ids)
    return [None if t in special else piece for t, piece in zip(ids, pieces, strict=True)]


def setup(p, params: ScfgParams, report: RunReport) -> None:
    """Patch a clone of this pass's UNet and make it the pass's UNet (idempotent)."""
    global _current
    teardown()
    model = p.sd_model
    unet = model.forge_objects.unet.clone()
    blocks = transformer_blocks(unet.model.diffusion_model)
    present = sorted(set(blocks.values()))
    factors = select_levels(present, params.level_factors(), sdxl=bool(getattr(model, "is_sdxl", False)))
    if not factors:
        report.note(f"S-CFG levels '{params.levels}' do not exist in this model "
                    f"(attention at latent/{present}); S-CFG is off")
        return
    run = _Run(p, params, report, {k: f for k, f in blocks.items() if f in factors}, factors)
    run.install(unet)
    _current = (model, model.forge_objects.unet, unet, run)
    model.forge_objects.unet = unet


def teardown() -> None:
    """Deactivate the last run and give its model back the UNet it had before ``setup``."""
    global _current
    if _current is None:
        return
    model, original, patched, run = _current
    _current = None
    run.close()
    if getattr(model.forge_objects, "unet", None) is patched:
        model.forge_objects.unet = original


def installed() -> list[str]:
    """The hooks of the active run, e.g. ["attn1 input.7", ..., "sampler_post_cfg_function"]."""
    return [] if _current is None else list(_current[3].hooks)


def transformer_blocks(diffusion_model) -> dict[tuple[str, int, int], int]:
    """Every BasicTransformerBlock as (block, id, index) -> its downsample factor.

    The factor doubles after each input block holding a Downsample and halves after each output
    block holding an Upsample (ResBlock up/down hold one too).
    """
    found, factor = {}, 1

    def visit(module, name, number):
        kinds = [type(m).__name__ for m in module.modules()]
        for index in range(kinds.count("BasicTransformerBlock")):
            found[(name, number, index)] = factor
        return kinds

    for number, module in enumerate(diffusion_model.input_blocks):
        if "Downsample" in visit(module, "input", number):
            factor *= 2
    visit(diffusion_model.middle_block, "middle", 0)
    for number, module in enumerate(diffusion_model.output_blocks):
        if "Upsample" in visit(module, "output", number):
            factor //= 2
    return found


def _cond_order(cond, uncond) -> list[int]:
    """Which AND sub-prompt each cond chunk is, in the order Forge's UNet calls see them.

    calc_cond_uncond_batch takes the entries that concatenate with the first one left, highest index
    first, and a memory split only cuts that run into several calls, so the order never depends on it.
    """
    from backend.sampling.sampling_function import cond_equal_size

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


def _hook(fn, prev=None):
    """A plain function calling ``fn``, marked as ours: deep copies of model_options share it."""
    def hook(*args):
        return fn(*args)

    hook._scfg, hook._scfg_prev = True, prev
    return hook


class _Run:
    """One sampling pass: the installed hooks and the current step's capture."""

    def __init__(self, p, params: ScfgParams, report: RunReport, keys: dict, factors: tuple[int, ...]):
        self.p, self.params, self.report = p, params, report
        self.keys, self.factors = keys, factors
        self.last_key = max(keys, key=lambda k: (("input", "middle", "output").index(k[0]), k[1], k[2]))
        self.hooks: list[str] = []
        self.patches: set = set()  # our attention patches, to check every step that they still apply
        self.active, self.armed, self.scale, self.edit, self.at = True, None, 1.0, 1.0, None
        self._reset(None)

    # ----- installation -----------------------------------------------------------------
    def install(self, unet) -> None:
        from backend import attention

        options = unet.model_options
        for option in ("conditioning_modifiers", "sampler_pre_cfg_function", "sampler_post_cfg_function"):
            if option in options:  # an earlier install on this same UNet: drop its entries
                options[option] = [f for f in options[option] if not _ours(f)]
        existing = options.get("transformer_options", {}).get("patches_replace", {})
        for name in ("attn1", "attn2"):
            taken = existing.get(name, {})
            blocks = sorted({k[:2] for k in self.keys})
            for key in blocks + [k for k in self.keys if k in taken]:
                patch = self._attention_patch(name, _unwrap(taken.get(key)), attention)
                unet.set_model_patch_replace(patch, name, *key)
                self.patches.add(patch)
                self.hooks.append(f"{name} {'.'.join(map(str, key))}")
        unet.add_conditioning_modifier(_hook(self.arm))
        unet.add_sampler_pre_cfg_function(_hook(self.begin))
        prev = _unwrap(options.get("sampler_cfg_function"))
        if prev is not None:
            unet.set_model_sampler_cfg_function(_hook(lambda args: self.combine_chained(args, prev), prev))
            self.hooks.append("sampler_cfg_function (chained)")
        else:
            unet.set_model_sampler_post_cfg_function(_hook(self.combine_post))
            self.hooks.append("sampler_post_cfg_function")
        self.hooks += ["conditioning_modifier", "sampler_pre_cfg_function"]
        try:
            unet.add_extra_preserved_memory_during_sampling(self._reserve(unet))
        except (AttributeError, TypeError, ValueError):
            pass

    def _attention_patch(self, name: str, prev, attention):
        observe = self.self_attention if name == "attn1" else self.cross_attention

        def patch(q, k, v, extra_options):
            if prev is not None:
                out = prev(q, k, v, extra_options)
            else:
                out = attention.attention_function(q, k, v, extra_options["n_heads"])
            if self.open:
                observe(q, k, extra_options)
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
        self._reset(None)
        self.p = self.armed = None

    # ----- one step ---------------------------------------------------------------------
    def _reset(self, capture) -> None:
        self.capture, self.open, self.skip = capture, capture is not None, None
        self.chunks = self.cond_seen = 0

    def arm(self, model, x, timestep, uncond, cond, cond_scale, model_options, seed):
        """Conditioning modifier: the step's CFG scale and latent; the pre-cfg call on this same
        latent is the step's own. A nested ``sampling_function_inner`` run by a later modifier
        (Reference-only's recording pass, on a noised reference latent) is not."""
        if self.armed is not None:
            self.report.fallback("a step's own sampling call was not recognised (another extension "
                                 "replaced the latent before CFG)", warn=True)
        self.armed = (cond_scale, x) if self.active else None
        return model, x, timestep, uncond, cond, cond_scale, model_options, seed

    def _nested(self, x) -> bool:
        """A sampling call inside this step's conditioning modifiers, on another latent."""
        return self.armed is not None and x is not self.armed[1]

    def begin(self, model, cond, uncond, x, timestep, model_options):
        """Pre-cfg function: open the capture window if this step's layout is one S-CFG handles."""
        if self._nested(x):
            return model, cond, uncond, x, timestep, model_options
        scale, self.armed = (self.armed or (None, None))[0], None
        if scale is not None:
            self._reset(None)
            try:
                self.skip = self._skip_reason(cond, uncond, scale, model_options)
                if self.skip is None:
                    height, width = x.shape[-2:]
                    grid = mask_grid_for(height, width, self.factors)
                    self._reset(StepCapture(self.params, grid, len(self.keys)))
                    self.batch, self.conds, self.scale = x.shape[0], len(cond), scale
                    self.order, self.weights = _cond_order(cond, uncond), [c.get("strength", 1) for c in cond]
                    edit = sum(self.weights)  # as Forge's default combination
                    self.edit = 1.0 if math.isclose(edit, 1.0) else edit
            except Exception as error:
                self.skip = (f"S-CFG failed before the UNet: {error}", True, error)
        return model, cond, uncond, x, timestep, model_options

    def _skip_reason(self, cond, uncond, scale, model_options):
        """(reason, warn, None) when this step must use plain CFG, else None."""
        if uncond is None or math.isclose(scale, 1.0):
            return ("CFG scale 1 (no unconditional pass)", False, None)
        denoiser = getattr(getattr(self.p, "sampler", None), "model_wrap_cfg", None)
        self.at = None
        if denoiser is not None and denoiser.total_steps:
            self.at = denoiser.step, denoiser.total_steps
            if not self.params.active_at(denoiser.step, denoiser.total_steps):
                return ("step outside S-CFG's start/end", False, None)
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
        return None

    def _rows(self, extra_options, q) -> tuple[int, ...]:
        """Global row ids of this call: image i of AND sub-prompt j -> j*B + i, of the uncond -> J*B + i."""
        labels, batch = extra_options["cond_or_uncond"], self.batch
        if q.shape[0] != batch * len(labels):
            raise CaptureError(f"{q.shape[0]} attention rows for {len(labels)} chunks of {batch} images")
        rows, conds = [], self.cond_seen
        for label in labels:
            if label == COND:
                if conds >= self.conds:
                    raise CaptureError("more cond chunks than conds in one step")
                first, conds = self.order[conds] * batch, conds + 1
            else:
                first = self.conds * batch
            rows.extend(range(first, first + batch))
        return tuple(rows)

    def _key(self, extra_options):
        block = extra_options["block"]
        return block[0], block[1], extra_options.get("block_index", 0)

    def self_attention(self, q, k, extra_options) -> None:
        try:
            key = self._key(extra_options)
            self.capture.self_attention(key, self._rows(extra_options, q), q, k,
                                        extra_options["n_heads"], None)
        except Exception as error:
            self._fail(error)

    def cross_attention(self, q, k, extra_options) -> None:
        try:
            key = self._key(extra_options)
            height, width = extra_options["original_shape"][-2:]
            size = grid_factor(height, width, q.shape[1])
            if size is None:
                raise CaptureError(f"{q.shape[1]} tokens at {key} match no level of {height}x{width}")
            labels = extra_options["cond_or_uncond"]
            self.capture.cross_attention(key, self._rows(extra_options, q), q, k,
                                         extra_options["n_heads"], None, size)
            if key == self.last_key:  # this UNet call is done: count its chunks
                self.chunks += len(labels)
                self.cond_seen += labels.count(COND)
                self.open = self.chunks < self.conds + 1
        except Exception as error:
            self._fail(error)

    def _fail(self, error) -> None:
        self._reset(None)
        self.skip = (f"S-CFG capture failed: {error}", True, error)

    def _rate(self, cond, uncond, scale):
        """The step's rate map [B, 1, H, W] for cond/uncond predictions, or None for plain CFG."""
        capture, skip, chunks = self.capture, self.skip, self.chunks
        self._reset(None)
        if capture is None:
            if skip is not None:
                reason, warn, error = skip
                self.report.fallback(reason, warn=warn, exc=error)
            return None
        try:
            if chunks != self.conds + 1:
                raise CaptureError(f"saw {chunks} of {self.conds + 1} cond/uncond chunks")
            batch, conds = self.batch, self.conds
            # Forge hands over the AND sub-prompts' predictions averaged: each sub-prompt's rate map
            # is computed against that average, then they are weighted as the predictions were.
            results = [capture.result([Pair(j * batch + i, conds * batch + i, scale) for i in range(batch)],
                                      cond, uncond) for j in range(conds)]
            rate = mix_rates(torch.stack([result.rate for result in results]), self.weights)
        except Exception as error:
            self.report.fallback(f"S-CFG failed: {error}", warn=True, exc=error)
            return None
        self.report.step_applied(rate)
        if self.at is not None:  # previews (the report keeps nothing unless they are on)
            try:
                first = getattr(self.p, "iteration", 0) * getattr(self.p, "batch_size", batch)
                for j, result in enumerate(results):
                    self.report.record(*self.at, result, [(first + i, j) for i in range(batch)],
                                       [scale] * batch)
            except Exception as error:
                self.report.note(f"S-CFG could not record a preview: {error}")
        return rate

    def combine_post(self, args):
        """sampler_post_cfg_function, used when no sampler_cfg_function is set: adds γ·(r − 1)·(c − u).

        ``denoised`` is then Forge's own plain CFG, u + γ·e·(c − u) (e: the AND weights' sum, which
        only Forge's default path applies), so adding the correction gives exactly u + γ·e·r·(c − u)
        without taking the single cfg-function slot, and r ≡ 1 returns ``denoised`` bit for bit.
        Additive guidance terms in the same list (PAG's, SAG's) are independent of ours, so the
        order of the list does not matter and all of them act.
        """
        denoised = args["denoised"]
        if not self.active or self._nested(args["input"]):
            return denoised
        cond, uncond = args["cond_denoised"], args["uncond_denoised"]
        rate = self._rate(cond, uncond, self.scale * self.edit)
        if rate is None:
            return denoised
        return denoised + correction(cond, uncond, self.scale * self.edit, rate)

    def combine_chained(self, args, prev):
        """sampler_cfg_function when one was already set (Forge's Dynamic Thresholding): chain it.

        The cond handed to it is u + r·(c − u), so a linear combiner yields eq. 12 exactly and
        Dynamic Thresholding clamps the S-CFG-scaled guidance to its mimic range. A post-cfg
        correction would instead add γ·(r − 1)·(c − u) unclamped after the clamp, which at the high
        CFG that thresholding exists for (r is capped to 15/γ) would undo or overshoot it.
        """
        if not self.active or self._nested(args["input"]):
            return prev(args)
        cond, uncond = args["cond"], args["uncond"]  # x - x0: the same c - u up to sign
        rate = self._rate(cond, uncond, args["cond_scale"])
        if rate is None:
            return prev(args)
        scaled = prescale_cond(cond, uncond, rate)
        return prev({**args, "cond": scaled, "cond_denoised": args["input"] - scaled})

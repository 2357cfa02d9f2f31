"""AUTOMATIC1111 WebUI (v1.10.1) adapter: A1111's CFG callbacks and UNet modules -> ``scfg_ext`` core.

How one sampler call of ``CFGDenoiser.forward`` (modules/sd_samplers_cfg_denoiser.py) is handled:

``on_cfg_denoiser``   read the row layout of ``x_in`` (cond rows 0..n_cond-1 image-major, then the
                      uncond row n_cond+i of image i) and start a ``StepCapture`` for the step.
UNet pre-hook         each UNet call covers the next rows of ``x_in``, in order (batched, unbatched
                      and separate cond/uncond passes alike), so a running offset names its rows.
transformer pre-hook  the exact (h, w) of each target level (non-square and odd sizes).
attn1 / attn2 hooks   take the q and k that the attention's own ``to_q`` / ``to_k`` just produced
                      (LoRA, LLLite, fp8 casts included; recomputed only for inputs the
                      projections did not see) and hand them to the capture with the global row ids.
``on_cfg_denoised``   rate maps from the core; the cond rows of ``x_out`` are rewritten in place as
                      u + r·(c − u), so whichever combiner runs next (vanilla, Dynamic
                      Thresholding, a CFG-rescale patch) yields u + γ·w·r·(c − u).

The callbacks are registered once and stay registered: they do nothing unless ``setup`` installed a
run for the very ``p`` that the denoiser serves. Hooks and callbacks never raise into A1111: an
error means plain CFG for that step and one warning per run (``RunReport.fallback``).

The fallback path is proven end to end with the core's named-only ``test_fault`` parameter:
"cross_attention" raises inside the attn2 hook, "result" inside on_cfg_denoised.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field

import torch

from ..guidance import prescale_cond
from ..levels import mask_grid_for
from ..segment import Geometry
from ..step import CaptureError, Pair, StepCapture
from . import common
from .common import NO_GUIDANCE, NO_UNCOND


@dataclass
class Target:
    """One hooked BasicTransformerBlock: its capture id, name and parent SpatialTransformer.

    ``projected`` keeps the last input and output of its attn1/attn2 to_q/to_k, so the attention
    hooks reuse the projections the WebUI's own attention just made instead of recomputing them.
    """
    index: int
    name: str
    transformer: torch.nn.Module
    projected: dict = field(default_factory=dict)


@dataclass
class Call:
    """One ``CFGDenoiser.forward``: the row layout and what the UNet calls have shown so far."""
    capture: StepCapture
    n_rows: int
    n_cond: int
    conds_list: list
    gamma: float
    hw: tuple
    at: tuple  # (0-based sampling step, steps) for previews (common.sampler_step)
    offset: int = 0
    rows: tuple | None = None
    error: tuple | None = None  # (place, exception): the rest of the step is plain CFG


@dataclass
class Run:
    """What ``setup`` installed for one sampling pass of one ``p``."""
    p: object
    params: object
    report: object
    unet: torch.nn.Module | None = None
    targets: list = field(default_factory=list)
    factors: tuple = ()
    handles: list = field(default_factory=list)
    names: list = field(default_factory=list)
    sizes: dict = field(default_factory=dict)
    call: Call | None = None
    geometry: Geometry = field(default_factory=Geometry)  # the pass's constant tensors


_run: Run | None = None


# ----------------------------------------------------------------------------- interface

def setup(p, params, report) -> bool:
    """Install this pass's hooks (any previous install is removed first). False: nothing to hook."""
    teardown()
    _ensure_callbacks()
    from modules import shared

    global _run
    run = _run = Run(p, params, report)  # first, so that teardown finds what a raise left behind
    try:
        hooked = _hook(run, shared.sd_model.model.diffusion_model)
        if params.test_fault == "setup":
            raise RuntimeError("injected test fault in setup")
    except BaseException:
        teardown()
        raise
    if not hooked:
        _run = None
    return hooked


def teardown() -> None:
    """Remove every hook and forget the run; safe at any time, also after an interrupted run."""
    global _run
    run, _run = _run, None
    if run is None:
        return
    try:
        _unhook(run)
        if run.params.test_fault == "teardown":
            raise RuntimeError("injected test fault in teardown")
    finally:
        run.call = None
        for target in run.targets:
            target.projected.clear()


def installed() -> list[str]:
    """The hooks installed right now, by module name (for the status route)."""
    return list(_run.names) if _run is not None else []


def unsupported_reason(p) -> str | None:
    """Why S-CFG cannot run with the loaded model, or None."""
    from modules import sd_unet, shared

    model = shared.sd_model
    if getattr(model, "is_sd3", False):
        return "S-CFG needs a UNet with cross-attention; SD3 has none"
    if getattr(model, "cond_stage_key", None) == "edit":
        return "S-CFG does not support InstructPix2Pix (edit) models"
    if getattr(sd_unet, "current_unet", None) is not None:
        return "S-CFG cannot see the attention of a replacement UNet (sd_unet / TensorRT)"
    if (getattr(p, "extra_generation_params", None) or {}).get("SCFG Active"):
        return "incantations' S-CFG is active; use only one S-CFG"
    return None


def prompt_tokens(p, text: str) -> list[str | None]:
    """The CLIP pieces of ``text`` per context position, as A1111 chunks it (SDXL: its CLIP-L)."""
    from modules import shared

    return common.a1111_prompt_tokens(shared.sd_model.cond_stage_model, text)


# ----------------------------------------------------------------------------- hooks

def _hook(run: Run, unet) -> bool:
    """Hook the transformer blocks of the selected levels of ``unet`` and the UNet itself."""
    sites, run.factors, present = common.selected_sites(unet, run.params.level_factors())
    run.unet, run.targets = unet, []
    transformers = {id(s.transformer): (s.name.rsplit(".transformer_blocks", 1)[0], s.transformer)
                    for s in sites}
    for name, transformer in transformers.values():
        _add(run, name, transformer.register_forward_pre_hook(_guarded(run, "transformer", _on_transformer)))
    for site in sites:
        target = Target(len(run.targets), site.name, site.transformer)
        run.targets.append(target)
        for attn, fn in (("attn1", _on_attn1), ("attn2", _on_attn2)):
            module = getattr(site.block, attn)
            hook = _guarded(run, attn, functools.partial(fn, target))
            _add(run, f"{target.name}.{attn}", module.register_forward_hook(hook, with_kwargs=True))
            for linear in ("to_q", "to_k"):
                keep = _guarded(run, attn, functools.partial(_on_projection, target, f"{attn}.{linear}"))
                projection = getattr(module, linear)
                _add(run, f"{target.name}.{attn}.{linear}", projection.register_forward_hook(keep))
    if not run.targets:
        _unhook(run)
        run.report.note(f"no attention at levels {run.params.levels!r} (this model has "
                        f"{present}): S-CFG is off")
        return False
    _add(run, "diffusion_model", unet.register_forward_pre_hook(
        _guarded(run, "unet", _on_unet), with_kwargs=True))
    return True


def _add(run: Run, name: str, handle) -> None:
    run.handles.append(handle)
    run.names.append(name)


def _unhook(run: Run) -> None:
    """Remove every handle, even when one of them raises (then raise its error at the end)."""
    handles, run.handles = run.handles, []
    run.names.clear()
    errors = []
    for handle in handles:
        try:
            handle.remove()
        except Exception as error:
            errors.append(error)
    if errors:
        raise errors[0]


def _guarded(run: Run, place: str, fn):
    """A hook that works only for the live run's current step and never raises into A1111."""
    def hook(module, *args):
        call = run.call
        if _run is not run or call is None or call.error is not None:
            return None
        try:
            with torch.no_grad():
                fn(run, call, module, *args)
        except Exception as e:  # any failure means plain CFG for this step
            call.error = (place, e)
        return None
    return hook


def _on_unet(run: Run, call: Call, module, args, kwargs) -> None:
    """Name the rows of this UNet call: calls cover x_in in row order."""
    x = args[0] if args else kwargs["x"]
    if tuple(x.shape[-2:]) != call.hw:
        raise CaptureError(f"UNet called on {tuple(x.shape[-2:])}, not the latent {call.hw} (tiled?)")
    if call.offset >= call.n_rows:
        call.rows = None  # an extra pass after the CFG batch (e.g. PAG): not ours to read
        return
    if call.offset + x.shape[0] > call.n_rows:
        raise CaptureError(f"UNet call of {x.shape[0]} rows at row {call.offset} of {call.n_rows}")
    call.rows = tuple(range(call.offset, call.offset + x.shape[0]))
    call.offset += x.shape[0]


def _on_transformer(run: Run, call: Call, module, args) -> None:
    run.sizes[id(module)] = tuple(args[0].shape[-2:])


def _tokens(run: Run, call: Call, target: Target, x) -> tuple | None:
    """The rows of this attention call, or None for a call that is not the main pass."""
    if call.rows is None or x.shape[0] != len(call.rows):
        return None  # e.g. ControlNet reference-only's uncond-only attn1 call
    h, w = run.sizes[id(target.transformer)]
    if x.shape[1] != h * w:
        raise CaptureError(f"{target.name}: {x.shape[1]} tokens for a {h}x{w} level (ToMe? StyleAlign?)")
    return call.rows


def _on_projection(target: Target, key: str, run: Run, call: Call, module, args, output) -> None:
    target.projected[key] = (args[0], output)


def _project(target: Target, key: str, linear, x):
    """``linear(x)``: the output the attention itself just computed from this very tensor, else
    computed again. Identity, not shape, decides: Hypertile's tiles, Regional Prompter's context
    slices and reference-only's extended keys are other tensors and get recomputed."""
    kept = target.projected.pop(key, None)
    return kept[1] if kept is not None and kept[0] is x else linear(x)


def _on_attn1(target: Target, run: Run, call: Call, module, args, kwargs, output) -> None:
    """Self-attention: always k = to_k(x), whatever context other extensions pass in."""
    x = args[0] if args else kwargs["x"]
    rows = _tokens(run, call, target, x)
    if rows is not None:
        q = _project(target, "attn1.to_q", module.to_q, x)
        k = _project(target, "attn1.to_k", module.to_k, _hyper(x))
        call.capture.self_attention(target.index, rows, q, k, module.heads, getattr(module, "scale", None))


def _on_attn2(target: Target, run: Run, call: Call, module, args, kwargs, output) -> None:
    """Cross-attention: k from the context the layer saw, through hypernetworks as A1111 does."""
    x = args[0] if args else kwargs["x"]
    context = kwargs.get("context", args[1] if len(args) > 1 else None)
    rows = _tokens(run, call, target, x)
    if rows is not None and context is not None:
        q = _project(target, "attn2.to_q", module.to_q, x)
        k = _project(target, "attn2.to_k", module.to_k, _hyper(context))
        call.capture.cross_attention(target.index, rows, q, k, module.heads, getattr(module, "scale", None),
                                     run.sizes[id(target.transformer)])


def _hyper(context):
    """The context A1111's attention feeds to_k (modules/hypernetworks/hypernetwork.py:373)."""
    from modules import shared
    from modules.hypernetworks import hypernetwork

    if not shared.loaded_hypernetworks:
        return context
    return hypernetwork.apply_hypernetworks(shared.loaded_hypernetworks, context)[0]


# ----------------------------------------------------------------------------- callbacks

def on_cfg_denoiser(params) -> None:
    """Start a step's capture for our ``p``; any other denoiser (ADetailer, xyz) is left alone."""
    run = _run
    if run is None:
        return
    run.call = None
    denoiser = params.denoiser
    if denoiser.p is not run.p:
        return
    try:
        _follow_model(run)
        call, calls, _, _ = common.sampler_step(denoiser)
        if not run.targets:
            return
        if not run.params.active_at(call, calls):
            run.report.fallback(common.OUTSIDE_WINDOW)
            return
        if _uncond_skipped(params, denoiser):
            run.report.fallback(NO_UNCOND)
            return
        if common.no_guidance(denoiser.sampler.sampler_extra_args["cond_scale"]):
            run.report.fallback(NO_GUIDANCE)
            return
        run.call = _new_call(run, params, denoiser)
    except Exception as e:
        _report_error(run, "on_cfg_denoiser", e)


def on_cfg_denoised(params) -> None:
    """Rewrite the cond rows of x_out in place with the step's rate maps (or leave plain CFG)."""
    run = _run
    call = run.call if run is not None else None
    if call is None:
        return
    run.call = None
    for target in run.targets:  # projections of calls no hook consumed (e.g. PAG's extra pass)
        target.projected.clear()
    try:
        if call.error is not None:
            _report_error(run, *call.error)
        elif call.offset == call.n_cond:
            run.report.fallback(NO_UNCOND)
        elif call.offset != call.n_rows:
            run.report.fallback("the UNet calls did not cover the CFG batch", warn=True)
        else:
            _apply(run, call, params.x)
    except Exception as e:
        _report_error(run, "on_cfg_denoised", e)


def _report_error(run: Run, place: str, e: Exception) -> None:
    """Plain CFG for the step; one warning per run and kind (the details go to the log)."""
    if isinstance(e, CaptureError):
        run.report.fallback("attention layout not understood", warn=True, exc=e)
    else:
        run.report.fallback(f"error in {place} ({type(e).__name__})", warn=True, exc=e)


def _new_call(run: Run, params, denoiser) -> Call:
    """The row layout of x_in (sd_samplers_cfg_denoiser.py:202-209) and γ of this step."""
    extra = denoiser.sampler.sampler_extra_args
    conds_list, row = [], 0
    for prompts in extra["cond"].batch:  # one list per image, rows numbered in order
        conds_list.append([(row + j, c.weight) for j, c in enumerate(prompts)])
        row += len(prompts)
    n_rows = params.x.shape[0]
    if n_rows != row + len(conds_list):
        raise CaptureError(f"x_in has {n_rows} rows for {row} cond + {len(conds_list)} uncond")
    hw = tuple(params.x.shape[-2:])
    capture = StepCapture(run.params, mask_grid_for(*hw, run.factors), len(run.targets),
                          upcast=bool(getattr(_opts(), "upcast_attn", False)), geometry=run.geometry)
    gamma = float(extra["cond_scale"]) * float(denoiser.cond_scale_miltiplier)  # 1/12.5 for CFG++
    _, _, step, steps = common.sampler_step(denoiser)
    return Call(capture, n_rows, row, conds_list, gamma, hw, (step, steps))


def _opts():
    from modules.shared import opts

    return opts


def _uncond_skipped(params, denoiser) -> bool:
    """Whether forward() will skip the uncond pass (cfg_denoiser.py:218-231), to spare the work.

    Row accounting in on_cfg_denoised is the final check; this only avoids capturing for nothing.
    """
    opts = _opts()
    if opts.skip_early_cond != 0 and denoiser.step / denoiser.total_steps <= opts.skip_early_cond:
        return True
    s_min = denoiser.sampler.sampler_extra_args.get("s_min_uncond") or 0
    return bool((denoiser.step % 2 or getattr(opts, "s_min_uncond_all", False)) and s_min > 0
                and params.sigma[0] < s_min)


def _apply(run: Run, call: Call, x_out) -> None:
    pairs = [Pair(row, call.n_cond + i, call.gamma * abs(weight))
             for i, conds in enumerate(call.conds_list) for row, weight in conds]
    c_rows, u_rows = [p.cond_row for p in pairs], [p.uncond_row for p in pairs]
    cond, uncond = x_out[c_rows], x_out[u_rows]
    result = call.capture.result(pairs, cond, uncond)
    x_out[c_rows] = prescale_cond(cond, uncond, result.rate)  # in place: the combiner reads this tensor
    run.report.step_applied(result.rate)
    _record(run, call, result, pairs)


def _record(run: Run, call: Call, result, pairs: list) -> None:
    """Previews (the report keeps nothing unless they are on); a failure costs only the preview."""
    try:
        rows = common.preview_rows(run.p, [len(conds) for conds in call.conds_list])
        run.report.record(*call.at, result, rows, [pair.scale for pair in pairs])
    except Exception as e:
        run.report.note(f"could not record a preview: {e}")


def _follow_model(run: Run) -> None:
    """Re-hook when the UNet object changed mid-run (refiner switch, apply_refiner at :160)."""
    from modules import shared

    unet = shared.sd_model.model.diffusion_model
    if unet is not run.unet:
        _unhook(run)
        run.sizes.clear()
        _hook(run, unet)


def _ensure_callbacks() -> None:
    """Register the two CFG callbacks unless present (clear_callbacks() on a UI reload drops them)."""
    from modules import script_callbacks

    for category, register, fn in (("cfg_denoiser", script_callbacks.on_cfg_denoiser, on_cfg_denoiser),
                                   ("cfg_denoised", script_callbacks.on_cfg_denoised, on_cfg_denoised)):
        if not any(c.callback is fn for c in script_callbacks.callback_map[f"callbacks_{category}"]):
            try:
                register(fn, name="scfg")
            except TypeError:  # registries without names (Forge Classic)
                register(fn)


try:  # register at import inside the WebUI; elsewhere (unit tests, Forge) there is nothing to do
    _ensure_callbacks()
except ImportError:
    pass
except Exception as error:  # a host that refuses them: S-CFG reports it at setup, the WebUI runs on
    logging.getLogger("scfg").warning("S-CFG: could not register its CFG callbacks: %s", error)

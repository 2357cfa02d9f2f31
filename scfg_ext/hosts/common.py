"""What every host adapter decides the same way: the UNet walk, levels, steps, rows, prompt tokens.

The adapters translate their WebUI's hooks; everything here is a decision that must not differ
between hosts (a user switching from A1111 to Forge gets the same S-CFG). Nothing here imports a
WebUI: the host objects are passed in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..levels import select_levels

NO_UNCOND = "no unconditional pass (NGMS / skip early CFG)"
NO_GUIDANCE = "CFG scale ≤ 1 (no guidance to redistribute)"
OUTSIDE_WINDOW = "step outside S-CFG's start/end"


@dataclass(frozen=True)
class Site:
    """One BasicTransformerBlock of the UNet.

    key: (block kind, block number, index), the address Forge-family attention patches use:
        ("input", 7, 0); name: its module path in ldm's UNetModel ("input_blocks.7.1.transformer_blocks.0").
    """
    factor: int
    key: tuple[str, int, int]
    name: str
    block: torch.nn.Module
    transformer: torch.nn.Module  # the SpatialTransformer holding it


def transformer_sites(unet) -> list[Site]:
    """Every BasicTransformerBlock of an ldm/sgm-layout UNet (A1111's, Forge's, ldm_patched's), by
    class name, with its downsample factor: it doubles after each input block holding a
    Downsample and halves after each output block holding an Upsample."""
    sites, factor = [], 1

    def visit(module, kind: str, number: int, path: str) -> set[str]:
        for child_name, child in module.named_modules():
            if type(child).__name__ != "SpatialTransformer":
                continue
            for j, block in enumerate(child.transformer_blocks):  # j: the patches' block_index
                sites.append(Site(factor, (kind, number, j),
                                  f"{path}.{child_name}.transformer_blocks.{j}", block, child))
        return {type(m).__name__ for m in module.modules()}

    for number, module in enumerate(unet.input_blocks):
        if "Downsample" in visit(module, "input", number, f"input_blocks.{number}"):
            factor *= 2
    visit(unet.middle_block, "middle", 0, "middle_block")
    for number, module in enumerate(unet.output_blocks):
        if "Upsample" in visit(module, "output", number, f"output_blocks.{number}"):
            factor //= 2
    return sites


def selected_sites(unet, explicit: tuple[int, ...] | None) -> tuple[list[Site], tuple[int, ...], list[int]]:
    """(the sites S-CFG reads, their factors, every factor with attention) for ``unet``.

    Blocks whose attn1 is a cross-attention (``disable_self_attn``) have no self-attention to refine
    with and are skipped.
    """
    sites = transformer_sites(unet)
    present = sorted({s.factor for s in sites})
    factors = select_levels(present, explicit)
    chosen = [s for s in sites if s.factor in factors and not getattr(s.block, "disable_self_attn", False)]
    return chosen, factors, present


def no_guidance(cfg_scale: float) -> bool:
    """At γ ≤ 1 plain CFG is the cond prediction or less: nothing to redistribute (plain CFG)."""
    return float(cfg_scale) <= 1.0


def sampler_step(denoiser) -> tuple[int, int, int, int]:
    """(call, calls, step, steps) of the WebUI's CFG denoiser (A1111 and the Forge family alike).

    call/calls count the denoiser's calls (second-order samplers call twice a step) and decide the
    start/end window; step/steps are sampling steps, 0-based, for previews.
    """
    call, calls = int(denoiser.step), int(denoiser.total_steps)
    steps = int(getattr(denoiser, "steps", None) or calls)
    return call, calls, call * steps // max(calls, 1), steps


def preview_rows(p, counts: list[int]) -> list[tuple[int, int]]:
    """(image index in the job, AND sub-prompt index) of each cond row; counts[i] sub-prompts of
    image i of this batch, rows image-major."""
    first = getattr(p, "iteration", 0) * getattr(p, "batch_size", len(counts))
    return [(first + i, j) for i, n in enumerate(counts) for j in range(n)]


def prompt_tokens(engine, text: str, pieces=None) -> list[str | None]:
    """The tokenizer pieces of ``text`` per context position, as the WebUI chunks it (77 per chunk),
    None for START, END and padding. ``engine`` is A1111's/Forge's CLIP text processing object
    (``tokenize_line``, ``id_start``/``id_end``/``id_pad``); ``pieces`` maps ids to strings
    (default: its transformers tokenizer's ``convert_ids_to_tokens``)."""
    chunks, _ = engine.tokenize_line(text)
    ids = [t for chunk in chunks for t in chunk.tokens]
    strings = pieces(ids) if pieces is not None else engine.tokenizer.convert_ids_to_tokens(ids)
    special = {engine.id_start, engine.id_end, engine.id_pad}
    return [None if t in special else piece for t, piece in zip(ids, strings, strict=True)]


def a1111_prompt_tokens(cond_stage_model, text: str) -> list[str | None]:
    """``prompt_tokens`` for A1111's text encoder wrappers (A1111, reForge, Forge Classic): SD1's
    CLIP, SDXL's CLIP-L (the first embedder), SD2's OpenCLIP (A1111's own BPE decoder)."""
    clip = cond_stage_model.embedders[0] if hasattr(cond_stage_model, "embedders") else cond_stage_model
    if hasattr(clip, "tokenizer"):  # transformers' CLIPTokenizer (SD1, SDXL)
        return prompt_tokens(clip, text)
    from modules.sd_hijack_open_clip import tokenizer  # SD2's OpenCLIP

    return prompt_tokens(clip, text, lambda ids: [tokenizer.decoder.get(t, "") for t in ids])


def loaded_unet(model):
    """The ldm/sgm UNet of a loaded WebUI model (Forge family: behind its UNet patcher; A1111:
    ``model.model.diffusion_model``), or None (no model, or not a UNet model)."""
    forge = getattr(model, "forge_objects", None)
    holder = forge.unet.model if forge is not None else getattr(model, "model", None)
    unet = getattr(holder, "diffusion_model", None)
    return unet if hasattr(unet, "input_blocks") else None

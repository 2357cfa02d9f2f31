"""Previews of what S-CFG did: token regions with a word legend, the foreground, the rate map.

Hosts hand over the low-resolution maps of a few steps (``StepResult``) and the token strings of each
cond row as their tokenizer produced them (CLIP BPE: a word's last piece ends in ``</w>``; START, END
and padding as ``None``). Rendering uses PIL and torch only, and the output is deterministic.
"""

from __future__ import annotations

import colorsys
import re
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

OTHER = "background/other"
PANEL = 192  # each map is drawn at least this large, whatever the latent size
MARGIN = 8


@dataclass
class PreviewStep:
    """One recorded step of one cond row (mask grid resolution, CPU tensors)."""
    step: int           # 1-based sampling step
    total: int
    labels: torch.Tensor      # [h, w] token position per pixel
    foreground: torch.Tensor  # [h, w] 0/1
    rate: torch.Tensor        # [H, W]
    scale: float              # γ of this row, to print the effective range
    phase: str = ""           # "" for the first pass, "hires" for the hires-fix pass


def word_groups(tokens: list[str | None]) -> tuple[list[int], list[str]]:
    """Merge sub-word tokens into words: a group index per position (-1 = other) and the word names.

    ``tokens[i]`` is None for START, END and padding positions, else the BPE piece; a piece ending in
    ``</w>`` closes its word. The same word twice in a prompt gives two groups.
    """
    groups, names, current = [], [], ""
    for piece in tokens:
        if piece is None:
            current = ""  # a word cut by a chunk boundary ends here
            groups.append(-1)
            continue
        if not current:
            names.append("")  # placeholder, named when the word closes
        current += piece.replace("</w>", "")
        groups.append(len(names) - 1)
        names[-1] = current
        if piece.endswith("</w>"):
            current = ""
    return groups, names


def palette(n: int) -> list[tuple[int, int, int]]:
    """n well-separated colours (golden-ratio hues), the same for the same n."""
    return [tuple(int(255 * c) for c in colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.65, 0.95))
            for i in range(n)]


def _font(size: int = 14):
    for name in ("DejaVuSans.ttf", "Arial.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            pass
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size bitmap font
        return ImageFont.load_default()


def _upscaled(img: Image.Image) -> Image.Image:
    factor = max(1, -(-PANEL // max(img.size)))
    return img.resize((img.width * factor, img.height * factor), Image.NEAREST)


def region_image(labels: torch.Tensor, groups: list[int], colours) -> Image.Image:
    """Token regions coloured by word; positions outside any word are grey."""
    lut = torch.tensor([colours[g] if 0 <= g < len(colours) else (90, 90, 90) for g in groups]
                       + [(90, 90, 90)], dtype=torch.uint8)
    index = labels.clamp(max=len(groups)).long()
    return Image.fromarray(lut[index].numpy(), "RGB")


def mask_image(mask: torch.Tensor) -> Image.Image:
    return Image.fromarray((mask.float().clamp(0, 1) * 255).byte().numpy(), "L").convert("RGB")


def heat_image(rate: torch.Tensor, low: float, high: float) -> Image.Image:
    """Blue (low) to red (high) over [low, high]."""
    t = ((rate.float() - low) / max(high - low, 1e-6)).clamp(0, 1)
    rgb = torch.stack([t, 1 - (2 * t - 1).abs(), 1 - t], -1)
    return Image.fromarray((rgb * 255).byte().numpy(), "RGB")


def _with_scale_bar(heat: Image.Image, low: float, high: float, scale: float, font) -> Image.Image:
    """The heat map, its colour scale under it, and the scale's ends (as rate and as CFG) below."""
    ramp = torch.linspace(0, 1, heat.width)[None].expand(10, heat.width)
    out = Image.new("RGB", (heat.width, heat.height + 34), (24, 24, 24))
    out.paste(heat, (0, 0))
    out.paste(heat_image(ramp, 0.0, 1.0), (0, heat.height + 4))
    draw, y = ImageDraw.Draw(out), heat.height + 16
    right = f"{high:.2f}"
    draw.text((0, y), f"{low:.2f}", fill=(230, 230, 230), font=font)
    draw.text((heat.width - int(font.getlength(right)), y), right, fill=(230, 230, 230), font=font)
    middle = f"CFG {scale * low:.1f}-{scale * high:.1f}"
    draw.text(((heat.width - int(font.getlength(middle))) // 2, y), middle, fill=(170, 170, 170), font=font)
    return out


def _step_row(s: PreviewStep, groups, colours, font):
    """The three panels of one step and their captions."""
    lo, hi = s.rate.min().item(), s.rate.max().item()
    panels = [_upscaled(region_image(s.labels, groups, colours)), _upscaled(mask_image(s.foreground)),
              _with_scale_bar(_upscaled(heat_image(s.rate, lo, hi)), lo, hi, s.scale, font)]
    captions = [f"{s.phase + ' ' if s.phase else ''}step {s.step}/{s.total}: regions", "foreground",
                "rate map"]
    return panels, captions


def render(steps: list[PreviewStep], tokens: list[str | None], title: str = "") -> Image.Image:
    """One image: a row per recorded step with regions, foreground and rate map, then the legend."""
    groups, names = word_groups(tokens)
    colours = palette(len(names))
    font, line = _font(), 20
    rows = [_step_row(s, groups, colours, font) for s in steps]
    legend = [(colours[i], name) for i, name in enumerate(names)] + [((90, 90, 90), OTHER)]
    width = max((sum(p.width + MARGIN for p in panels) + MARGIN for panels, _ in rows), default=400)
    legend_rows = _legend_layout(legend, width, font)
    height = (MARGIN + (line if title else 0) + len(legend_rows) * line + MARGIN
              + sum(max(p.height for p in panels) + line + MARGIN for panels, _ in rows))
    img = Image.new("RGB", (width, height), (24, 24, 24))
    draw = ImageDraw.Draw(img)
    y = MARGIN
    if title:
        draw.text((MARGIN, y), title, fill=(240, 240, 240), font=font)
        y += line
    for panels, captions in rows:
        x = MARGIN
        for panel, caption in zip(panels, captions, strict=True):
            draw.text((x, y), caption, fill=(230, 230, 230), font=font)
            img.paste(panel, (x, y + line))
            x += panel.width + MARGIN
        y += line + max(p.height for p in panels) + MARGIN
    for entries in legend_rows:
        x = MARGIN
        for colour, name, w in entries:
            draw.rectangle([x, y + 3, x + 12, y + 15], fill=colour)
            draw.text((x + 16, y), name, fill=(240, 240, 240), font=font)
            x += w
        y += line
    return img


def overlay(image: Image.Image, shot: PreviewStep, tokens: list[str | None], alpha: float = 0.4,
            min_share: float = 0.01) -> Image.Image:
    """The image with the token regions of ``shot`` drawn over it: a translucent colour and an
    outline per word, the word written at its region's centre (regions under ``min_share`` of the
    image stay unnamed). Positions that are no word (START, END, padding) are left uncoloured."""
    groups, names = word_groups(tokens)
    colours = palette(len(names))
    lut = torch.tensor([g if 0 <= g < len(names) else -1 for g in groups] + [-1])
    word = lut[shot.labels.clamp(max=len(groups)).long()]  # [h, w] word index, -1 = other
    word = torch.nn.functional.interpolate(word[None, None].float(), size=(image.height, image.width),
                                           mode="nearest")[0, 0].long()
    rgb = torch.tensor([*colours, (0, 0, 0)], dtype=torch.float32)[word]  # -1 -> the last row
    base = torch.from_numpy(np.array(image.convert("RGB"))).float()
    painted = (word >= 0)[..., None].float() * alpha
    edge = torch.zeros_like(word, dtype=torch.bool)
    edge[:, 1:] |= word[:, 1:] != word[:, :-1]
    edge[1:, :] |= word[1:, :] != word[:-1, :]
    out = base * (1 - painted) + rgb * painted
    out[edge] = 255.0
    picture = Image.fromarray(out.round().clamp(0, 255).byte().numpy(), "RGB")
    draw, font = ImageDraw.Draw(picture), _font(max(10, min(image.width, image.height) // 24))
    ys, xs = torch.meshgrid(torch.arange(image.height), torch.arange(image.width), indexing="ij")
    for g, name in enumerate(names):
        inside = word == g
        count = int(inside.sum())
        if count < min_share * word.numel():
            continue
        cx, cy = float(xs[inside].float().mean()), float(ys[inside].float().mean())
        left, top, right, bottom = draw.textbbox((0, 0), name, font=font)
        draw.text((cx - (right - left) / 2, cy - (bottom - top) / 2), name, fill=(255, 255, 255), font=font,
                  stroke_width=2, stroke_fill=(0, 0, 0))
    return picture


def _legend_layout(legend, width, font):
    """Legend entries wrapped into lines that fit ``width``: [[(colour, name, entry width)]]."""
    lines, current, used = [], [], MARGIN
    for colour, name in legend:
        w = 16 + int(font.getlength(name)) + 14
        if current and used + w > width:
            lines.append(current)
            current, used = [], MARGIN
        current.append((colour, name, w))
        used += w
    if current:
        lines.append(current)
    return lines


def steps_to_record(total: int, count: int) -> set[int]:
    """``count`` step indices (0-based) spread evenly over a run of ``total`` steps, last included."""
    if total <= 0 or count <= 0:
        return set()
    count = min(count, total)
    return {round((i + 1) * total / count) - 1 for i in range(count)}


_AND = re.compile(r"\bAND\b")
_WEIGHT = re.compile(r"\s*:\s*[-+]?(?:\d+\.?|\d*\.\d+)\s*$")


def split_and(prompt: str) -> list[str]:
    """The sub-prompts of an AND prompt (WebUI composable diffusion), without their ':weight'."""
    return [_WEIGHT.sub("", part).strip() for part in _AND.split(prompt)]

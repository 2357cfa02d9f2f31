"""Seeded synthetic text-to-image data: flat-colour shapes with exact per-object masks.

``sample(seed, index)`` -> ``Sample(image uint8 [H,W,3], labels uint8 [H,W] (0 = background,
k = objects[k-1]), objects, background, caption)``, a pure function of (seed, index, size).

Objects: 1-3 of SHAPES x COLOURS, distinct colours within an image (so the colour names the
object), non-overlapping (disc bounds at least MARGIN apart), axis-aligned, upright.
Held-out split: a *combination* (background + the set of (colour, shape) objects) is held out for
evaluation when a hash of it falls in bucket 0 of 10 (``is_held_out``); training images never show
one, but every single (colour, shape) and background is still seen.  ``eval_prompts`` lists them.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 256
COLOURS = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220),
    "yellow": (240, 210, 30), "purple": (140, 40, 180), "orange": (245, 130, 20),
}
BACKGROUNDS = {"white": (250, 250, 250), "black": (15, 15, 15), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle", "star")
R_MIN, R_MAX, MARGIN = 0.11, 0.21, 0.03  # object "radius" (circumscribed disc) and gap, x image size
HELD_OUT_BUCKETS = 10


@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    cx: float  # centre and radius in pixels
    cy: float
    r: float


@dataclass
class Sample:
    image: np.ndarray
    labels: np.ndarray
    objects: list[Obj]
    background: str
    caption: str


def combo_key(background: str, objects) -> str:
    return background + "|" + ",".join(sorted(f"{o[0]} {o[1]}" for o in objects))


def is_held_out(background: str, objects) -> bool:
    """objects: iterable of (colour, shape, ...) tuples or Obj."""
    objs = [(o.colour, o.shape) if isinstance(o, Obj) else o for o in objects]
    h = hashlib.sha256(combo_key(background, objs).encode()).digest()
    return h[0] % HELD_OUT_BUCKETS == 0


def caption_for(background: str, objects) -> str:
    pairs = [(o.colour, o.shape) if isinstance(o, Obj) else o[:2] for o in objects]
    names = [f"{'an' if c[0] in 'aeiou' else 'a'} {c} {s}" for c, s in pairs]
    body = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"{body} on a {background} background"


def background_of(caption: str) -> str:
    """The background a caption of ``caption_for`` names ("... on a white background" -> "white")."""
    return caption.rsplit(" on a ", 1)[1].split()[0]


def polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Vertices of the shape inscribed in the disc (cx, cy, r); None for the circle."""
    if shape == "square":
        a = r / math.sqrt(2)
        return [(cx - a, cy - a), (cx + a, cy - a), (cx + a, cy + a), (cx - a, cy + a)]
    if shape == "triangle":
        return [(cx + r * math.cos(t), cy - r * math.sin(t)) for t in (math.pi / 2 + k * 2 * math.pi / 3
                                                                       for k in range(3))]
    if shape == "star":
        pts = [(r if k % 2 == 0 else 0.42 * r, math.pi / 2 + k * math.pi / 5) for k in range(10)]
        return [(cx + rr * math.cos(t), cy - rr * math.sin(t)) for rr, t in pts]
    return None


def draw_shape(draw: ImageDraw.ImageDraw, o: Obj, fill) -> None:
    pts = polygon(o.shape, o.cx, o.cy, o.r)
    if pts is None:
        draw.ellipse([o.cx - o.r, o.cy - o.r, o.cx + o.r, o.cy + o.r], fill=fill)
    else:
        draw.polygon(pts, fill=fill)


def render(objects: list[Obj], background: str, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    img = Image.new("RGB", (size, size), BACKGROUNDS[background])
    lab = Image.new("L", (size, size), 0)
    di, dl = ImageDraw.Draw(img), ImageDraw.Draw(lab)
    for k, o in enumerate(objects, 1):
        draw_shape(di, o, COLOURS[o.colour])
        draw_shape(dl, o, k)
    return np.asarray(img).copy(), np.asarray(lab).copy()


def place(rng: np.random.Generator, kinds: list[tuple[str, str]], size: int = SIZE) -> list[Obj] | None:
    """Random non-overlapping placement of (colour, shape) kinds; None if it did not fit."""
    out: list[Obj] = []
    for colour, shape in kinds:
        for _ in range(100):
            r = rng.uniform(R_MIN, R_MAX) * size
            cx, cy = rng.uniform(r + 2, size - r - 2, size=2)
            if all(math.hypot(cx - o.cx, cy - o.cy) > r + o.r + MARGIN * size for o in out):
                out.append(Obj(colour, shape, float(cx), float(cy), float(r)))
                break
        else:
            return None
    return out


def random_kinds(rng: np.random.Generator) -> tuple[str, list[tuple[str, str]]]:
    n = int(rng.choice([1, 2, 3], p=[0.3, 0.4, 0.3]))
    colours = rng.choice(list(COLOURS), size=n, replace=False)
    return str(rng.choice(list(BACKGROUNDS))), [(str(c), str(rng.choice(SHAPES))) for c in colours]


def sample(seed: int, index: int, split: str = "train", size: int = SIZE) -> Sample:
    """Deterministic sample ``index`` of ``split`` ('train': never a held-out combination; 'heldout':
    always one; 'any': no filter)."""
    rng = np.random.default_rng([seed, index, {"train": 0, "heldout": 1, "any": 2}[split]])
    while True:
        bg, kinds = random_kinds(rng)
        held = is_held_out(bg, kinds)
        if (split == "train" and held) or (split == "heldout" and not held):
            continue
        objs = place(rng, kinds, size)
        if objs is not None:
            img, lab = render(objs, bg, size)
            return Sample(img, lab, objs, bg, caption_for(bg, objs))


def eval_prompts(seed: int = 0, n: int = 32, max_objects: int = 3) -> list[tuple[str, list[tuple[str, str]]]]:
    """``n`` held-out (caption, [(colour, shape)]) prompts, a seeded draw of held-out combinations."""
    rng = np.random.default_rng([seed, 12345])
    seen, out = set(), []
    while len(out) < n:
        bg, kinds = random_kinds(rng)
        key = combo_key(bg, kinds)
        if len(kinds) <= max_objects and is_held_out(bg, kinds) and key not in seen:
            seen.add(key)
            out.append((caption_for(bg, kinds), kinds))
    return out


def batch(seed: int, start: int, count: int, split: str = "train", size: int = SIZE):
    """Stacked images [N,H,W,3] uint8, labels [N,H,W] uint8 and captions for indices start.."""
    ss = [sample(seed, i, split, size) for i in range(start, start + count)]
    return np.stack([s.image for s in ss]), np.stack([s.labels for s in ss]), [s.caption for s in ss]


def save_npz(path: str, seed: int, start: int, count: int, split: str = "train") -> None:
    imgs, labs, caps = batch(seed, start, count, split)
    np.savez_compressed(path, images=imgs, labels=labs, captions=np.array(caps))


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="write a grid of samples (and optionally an npz)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--split", default="train", choices=["train", "heldout", "any"])
    ap.add_argument("--grid", default="/work/scratch/quality/data_grid.png")
    ap.add_argument("--npz", default=None)
    a = ap.parse_args()
    imgs, labs, caps = batch(a.seed, 0, a.n, a.split)
    cols = math.ceil(math.sqrt(a.n))
    grid = np.zeros((cols * SIZE, cols * SIZE, 3), np.uint8)
    for i, im in enumerate(imgs):
        grid[(i // cols) * SIZE:(i // cols + 1) * SIZE, (i % cols) * SIZE:(i % cols + 1) * SIZE] = im
    Image.fromarray(grid).save(a.grid)
    print("\n".join(caps))
    if a.npz:
        save_npz(a.npz, a.seed, 0, a.n, a.split)

"""Quick quality check of a bench.quality.train model: do samples show the captioned shapes?

    python -m bench.quality.check --work /work/scratch/quality [--n 24] [--cfg 1 5] [--steps 25]

1. Validates the detector on ground-truth held-out images, then on their VAE reconstructions
   (the ceiling for samples).
2. Samples held-out prompts (combinations never seen in training) with diffusers' DDIM at each CFG
   scale, the same seeds for every scale, and scores them with the same detector.
Detector: each pixel -> nearest palette colour (objects + backgrounds; "other" if far from all);
background = the most common background colour; per object colour the largest connected component
of at least MIN_AREA pixels is an object, its shape from solidity (star) and bounding-box fill
(square ~1, circle ~pi/4, triangle ~1/2).
Writes WORK/check/grid_cfg*.png (one row per prompt) and WORK/check/metrics.json.
"""
from __future__ import annotations

import argparse
import json
import os

import cv2
import numpy as np
import torch

from bench.quality import data

PALETTE = {**data.COLOURS, **{"bg:" + k: v for k, v in data.BACKGROUNDS.items()}}
NAMES = list(PALETTE)
RGB = np.array([PALETTE[n] for n in NAMES], np.float32)
MAX_DIST = 60.0  # farther than this from every palette colour: "other"
MIN_AREA = 300  # px at 256²; the smallest object (a star of radius 28 px) has ~970


def classify(mask: np.ndarray) -> str:
    cnts, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    c = max(cnts, key=cv2.contourArea)
    area = float(mask.sum())
    hull = cv2.contourArea(cv2.convexHull(c)) + 1e-6
    _, _, w, h = cv2.boundingRect(c)
    if area / hull < 0.8:
        return "star"
    fill = area / (w * h)
    return "square" if fill > 0.9 else "circle" if fill > 0.66 else "triangle"


def detect(img: np.ndarray) -> dict:
    """img uint8 [H,W,3] -> {"background", "objects": {colour: shape}, "purity"}."""
    d = np.linalg.norm(img[:, :, None, :].astype(np.float32) - RGB[None, None], axis=-1)
    lab, near = d.argmin(-1), d.min(-1) < MAX_DIST
    counts = {n: int(((lab == i) & near).sum()) for i, n in enumerate(NAMES)}
    bg = max((n for n in NAMES if n.startswith("bg:")), key=counts.get)[3:]
    objs = {}
    for i, n in enumerate(NAMES):
        if n.startswith("bg:") or counts[n] < MIN_AREA:
            continue
        mask = ((lab == i) & near).astype(np.uint8)
        _, comp, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        j = 1 + int(stats[1:, cv2.CC_STAT_AREA].argmax())
        if stats[j, cv2.CC_STAT_AREA] >= MIN_AREA:
            objs[n] = classify(comp == j)
    return {"background": bg, "objects": objs, "purity": float(near.mean())}


def score(det: dict, background: str, kinds: list[tuple[str, str]]) -> dict:
    want = dict(kinds)
    colour_hits = [c in det["objects"] for c in want]
    shape_hits = [det["objects"].get(c) == s for c, s in want.items()]
    extra = [c for c in det["objects"] if c not in want]
    return {"bg": det["background"] == background, "colour_recall": float(np.mean(colour_hits)),
            "object_acc": float(np.mean(shape_hits)), "extra": len(extra),
            "exact": det["background"] == background and all(shape_hits) and not extra,
            "shapes": bool(det["objects"]) and det["purity"] > 0.9, "purity": det["purity"]}


def summarise(scores: list[dict]) -> dict:
    return {k: round(float(np.mean([s[k] for s in scores])), 3) for k in scores[0]}


def ground_truth(seed: int, n: int) -> dict:
    scores = []
    for i in range(n):
        s = data.sample(seed, i, "heldout")
        scores.append(score(detect(s.image), s.background, [(o.colour, o.shape) for o in s.objects]))
    return summarise(scores)


@torch.no_grad()
def vae_ceiling(vae, seed: int, n: int) -> dict:
    """The detector on VAE reconstructions of ground-truth held-out images (what sampling can reach)."""
    scores = []
    for i in range(n):
        s = data.sample(seed, i, "heldout")
        x = torch.from_numpy(s.image).permute(2, 0, 1)[None].float() / 127.5 - 1
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample[0].clamp(-1, 1)
        im = ((rec + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        scores.append(score(detect(im), s.background, [(o.colour, o.shape) for o in s.objects]))
    return summarise(scores)


def pipeline(work: str):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    ex = os.path.join(work, "export")
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(os.path.join(ex, "vae")),
        text_encoder=CLIPTextModel.from_pretrained(os.path.join(ex, "text_encoder")),
        tokenizer=CLIPTokenizer.from_pretrained(os.path.join(ex, "tokenizer")),
        unet=UNet2DConditionModel.from_pretrained(os.path.join(ex, "unet")), scheduler=sched,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def main(argv=None):
    from PIL import Image

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/work/scratch/quality")
    ap.add_argument("--n", type=int, default=24, help="held-out prompts")
    ap.add_argument("--cfg", type=float, nargs="+", default=[1.0, 5.0])
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gt-n", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    out = os.path.join(a.work, "check")
    os.makedirs(out, exist_ok=True)
    res = {"detector_on_ground_truth": ground_truth(a.seed, a.gt_n)}
    print("detector on ground truth:", res["detector_on_ground_truth"], flush=True)
    pipe = pipeline(a.work)
    pipe.set_progress_bar_config(disable=True)
    res["detector_on_vae_reconstructions"] = vae_ceiling(pipe.vae, a.seed, a.n)
    print("detector on VAE reconstructions:", res["detector_on_vae_reconstructions"], flush=True)
    prompts = data.eval_prompts(a.seed, a.n)
    per_prompt = {}
    for cfg in a.cfg:
        imgs, scores = [], []
        for i, (cap, kinds) in enumerate(prompts):
            g = torch.Generator().manual_seed(a.seed * 1000 + i)
            im = np.asarray(pipe(cap, height=data.SIZE, width=data.SIZE, num_inference_steps=a.steps,
                                 guidance_scale=cfg, generator=g).images[0])
            imgs.append(im)
            scores.append(score(detect(im), data.background_of(cap), kinds))
        res[f"cfg_{cfg:g}"] = summarise(scores)
        per_prompt[cfg] = [s["object_acc"] + s["bg"] for s in scores]
        print(f"cfg {cfg:g}:", res[f"cfg_{cfg:g}"], flush=True)
        cols = 6
        imgs += [np.zeros_like(imgs[0])] * (-len(imgs) % cols)
        rows = [np.concatenate(imgs[r:r + cols], 1) for r in range(0, len(imgs), cols)]
        Image.fromarray(np.concatenate(rows, 0)).save(os.path.join(out, f"grid_cfg{cfg:g}.png"))
    lo, hi = per_prompt[a.cfg[0]], per_prompt[a.cfg[-1]]
    res["paired"] = {f"cfg {a.cfg[-1]:g} better": sum(h > w for w, h in zip(lo, hi, strict=True)),
                     f"cfg {a.cfg[0]:g} better": sum(w > h for w, h in zip(lo, hi, strict=True)),
                     "ties": sum(w == h for w, h in zip(lo, hi, strict=True))}
    print("per prompt (object accuracy + background), same seeds:", res["paired"])
    res["prompts"] = [c for c, _ in prompts]
    with open(os.path.join(out, "metrics.json"), "w") as fh:
        json.dump(res, fh, indent=1)
    print("wrote", out)


if __name__ == "__main__":
    main()

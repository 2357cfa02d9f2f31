"""What S-CFG does to the images of the small shapes model, through a real WebUI's API.

    python -m bench.quality.evaluate --url http://127.0.0.1:7861 --out /work/scratch/quality/eval

1. Generates, for held-out prompts (combinations never seen in training, ``data.eval_prompts``),
   plain CFG at every --cfg scale and S-CFG at every scale above 1, the same seeds everywhere
   (txt2img, Euler, --steps, --seeds images per prompt; S-CFG with the extension's defaults but
   --levels). Resumable: finished requests are kept in OUT/runs.jsonl and their images in OUT/.
2. Scores every image with check.py's detector (object accuracy: each captioned object found with
   its colour and shape; exact: all of them, the background and nothing else) and each set of
   images with the FD of features.py (an FID analogue) against real renderings of the same prompts.
3. Effective guidance: S-CFG's rate r multiplies gamma per pixel, so its mean guidance is
   gamma * mean(r) over pixels and steps (the status route's rate mean); following "Guidance
   Matters" (ICLR 2026), each S-CFG point is also compared with plain CFG interpolated to that
   effective scale, not only at equal gamma.
4. Writes OUT/table.md, the trade-off plot DOCS/quality-tradeoff.png (caption match against FD,
   as the paper's Fig. 4, and against the effective scale) and DOCS/quality-pairs.png (CFG | S-CFG |
   S-CFG's regions over its image, for a few prompts at --picture-cfg).
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np

from bench.quality import data, features
from tests.e2e.client import api_call, checkpoint_titles, decode_png

MODEL = "scfg-shapes-sd15"


def save_png(path: str, image: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(image).save(path)


class Client:
    def __init__(self, url: str):
        self.url = url.rstrip("/")

    def call(self, path: str, body=None):
        code, answer = api_call(self.url, path, body, timeout=1800)
        if code != 200:
            raise RuntimeError(f"{path}: HTTP {code}: {answer}")
        return answer

    def use_model(self, name: str) -> None:
        titles = checkpoint_titles(self.call("/sdapi/v1/sd-models"), name)
        if not titles:
            raise SystemExit(f"no checkpoint {name} in the WebUI (bench/quality/README.md: convert, copy)")
        self.call("/sdapi/v1/options", {"sd_model_checkpoint": titles[0]})

    def txt2img(self, prompt: str, seed: int, cfg: float, steps: int, batch: int, scfg: dict | None):
        """Images [batch] and, with S-CFG, the status route's last run."""
        body = {"prompt": prompt, "negative_prompt": "", "seed": seed, "steps": steps, "cfg_scale": cfg,
                "width": data.SIZE, "height": data.SIZE, "sampler_name": "Euler", "batch_size": batch,
                "save_images": False, "alwayson_scripts": {"S-CFG": {"args": [scfg or {"enabled": False}]}}}
        images = [np.asarray(decode_png(b)) for b in self.call("/sdapi/v1/txt2img", body)["images"]]
        return images, self.call("/scfg/v1/status")["last_run"]


def configs(scales: list[float]) -> list[tuple[str, float]]:
    return [("cfg", g) for g in scales] + [("scfg", g) for g in scales if g > 1]


def config_dir(out: str, method: str, cfg: float) -> str:
    return os.path.join(out, f"{method}_{cfg:g}")


def generate(client: Client, a, prompts) -> list[dict]:
    path = os.path.join(a.out, "runs.jsonl")
    done = {}
    if os.path.isfile(path):
        for line in open(path):
            r = json.loads(line)
            done[(r["method"], r["cfg"], r["prompt_index"])] = r
    for method, cfg in configs(a.cfg):
        os.makedirs(config_dir(a.out, method, cfg), exist_ok=True)
        for i, (caption, _) in enumerate(prompts):
            if (method, cfg, i) in done:
                continue
            scfg = {"enabled": True, "levels": a.levels, "region": a.region} if method == "scfg" else None
            images, run = client.txt2img(caption, a.seed + 100 * i, cfg, a.steps, a.seeds, scfg)
            for j, im in enumerate(images[:a.seeds]):
                save_png(os.path.join(config_dir(a.out, method, cfg), f"{i:03d}_{j}.png"), im)
            if method == "scfg" and not run["steps_applied"]:
                raise RuntimeError(f"S-CFG did not apply: {run}")
            rate = run["rate"]["mean"] if method == "scfg" else 1.0
            r = {"method": method, "cfg": cfg, "prompt_index": i, "caption": caption, "rate_mean": rate,
                 "fallbacks": run.get("steps_fallback", {}) if method == "scfg" else {}}
            done[(method, cfg, i)] = r
            with open(path, "a") as fh:
                fh.write(json.dumps(r) + "\n")
            print(f"{method} cfg {cfg:g} prompt {i}: rate mean {rate:.3f}", flush=True)
    return list(done.values())


def real_images(prompts, per_prompt: int, seed: int) -> np.ndarray:
    """Renderings of the prompts' own combinations at random places: the reference distribution."""
    out = []
    for i, (caption, kinds) in enumerate(prompts):
        background = data.background_of(caption)
        rng = np.random.default_rng([seed, 777, i])
        while len(out) < (i + 1) * per_prompt:
            objs = data.place(rng, kinds)
            if objs is not None:
                out.append(data.render(objs, background)[0])
    return np.stack(out)


def score_configs(a, prompts, runs: list[dict], net) -> list[dict]:
    from bench.quality import check  # opencv: the training requirements

    reference = features.embed(net, real_images(prompts, 4 * a.seeds, a.seed))
    rows = []
    for method, cfg in configs(a.cfg):
        images, scores = [], []
        for i, (caption, kinds) in enumerate(prompts):
            for j in range(a.seeds):
                im = np.asarray(_load(os.path.join(config_dir(a.out, method, cfg), f"{i:03d}_{j}.png")))
                images.append(im)
                scores.append(check.score(check.detect(im), data.background_of(caption), kinds))
        rates = [r["rate_mean"] for r in runs if r["method"] == method and r["cfg"] == cfg]
        summary = check.summarise(scores)
        rows.append({"method": method, "cfg": cfg, "effective_cfg": round(cfg * float(np.mean(rates)), 3),
                     "object_acc": summary["object_acc"], "exact": summary["exact"], "bg": summary["bg"],
                     "colour_recall": summary["colour_recall"], "extra": summary["extra"],
                     "fd": round(features.frechet_distance(features.embed(net, np.stack(images)),
                                                           reference), 2),
                     "images": len(images)})
    return rows


def _load(path: str):
    from PIL import Image

    return Image.open(path).convert("RGB")


def interpolate_cfg(rows: list[dict], key: str, effective: float) -> float | None:
    """Plain CFG's ``key`` at an effective scale, linear between the measured scales (None outside)."""
    cfg = sorted((r["effective_cfg"], r[key]) for r in rows if r["method"] == "cfg")
    xs, ys = zip(*cfg, strict=True)
    if not xs[0] <= effective <= xs[-1]:
        return None
    return round(float(np.interp(effective, xs, ys)), 3)


def table(rows: list[dict]) -> str:
    head = ("| method | γ | effective γ (γ·mean r) | object accuracy | exact | background | FD ↓ "
            "| CFG at the same effective γ: object acc. / exact / FD |\n|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        matched = "–"
        if r["method"] == "scfg":
            vals = [interpolate_cfg(rows, k, r["effective_cfg"]) for k in ("object_acc", "exact", "fd")]
            matched = " / ".join("out of range" if v is None else f"{v:g}" for v in vals)
        name = "S-CFG" if r["method"] == "scfg" else "CFG"
        lines.append(f"| {name} | {r['cfg']:g} | {r['effective_cfg']:g} | {r['object_acc']:.3f} "
                     f"| {r['exact']:.3f} | {r['bg']:.3f} | {r['fd']:.2f} | {matched} |")
    return head + "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for method, style in (("cfg", "o-"), ("scfg", "s-")):
        pts = [r for r in rows if r["method"] == method]
        label = "CFG" if method == "cfg" else "S-CFG"
        left.plot([r["fd"] for r in pts], [r["object_acc"] for r in pts], style, label=label)
        for r in pts:
            left.annotate(f"γ={r['cfg']:g}", (r["fd"], r["object_acc"]), fontsize=7,
                          textcoords="offset points", xytext=(4, 4))
        right.plot([r["effective_cfg"] for r in pts], [r["object_acc"] for r in pts], style, label=label)
    left.set(xlabel="FD to real renderings (classifier features) ↓", ylabel="object accuracy ↑",
             title="caption match vs quality")
    right.set(xlabel="effective guidance γ·mean(r)", ylabel="object accuracy ↑", title="at matched guidance")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def pictures(client: Client, a, prompts, path: str) -> None:
    """Rows of [CFG | S-CFG | S-CFG's regions over its image] at --picture-cfg, one seed each."""
    from PIL import Image, ImageDraw

    rows = []
    for i in range(a.pictures):
        caption = prompts[i][0]
        seed = a.seed + 100 * i
        cfg_image = client.txt2img(caption, seed, a.picture_cfg, a.steps, 1, None)[0][0]
        body = {"enabled": True, "levels": a.levels, "region": a.region, "overlay": True,
                "api_previews": True}
        scfg_images = client.txt2img(caption, seed, a.picture_cfg, a.steps, 1, body)[0]
        overlay = scfg_images[1] if len(scfg_images) > 1 else np.zeros_like(scfg_images[0])
        strip = Image.fromarray(np.concatenate([cfg_image, scfg_images[0], _fit(overlay)], 1))
        canvas = Image.new("RGB", (strip.width, strip.height + 18), "white")
        canvas.paste(strip, (0, 18))
        label = f"\"{caption}\", scale {a.picture_cfg:g}, seed {seed}:  CFG | S-CFG | S-CFG regions"
        ImageDraw.Draw(canvas).text((4, 3), label, fill="black")
        rows.append(np.asarray(canvas))
    save_png(path, np.concatenate(rows, 0))


def _fit(image: np.ndarray) -> np.ndarray:
    from PIL import Image

    if image.shape[:2] == (data.SIZE, data.SIZE):
        return image
    return np.asarray(Image.fromarray(image).resize((data.SIZE, data.SIZE)))


def main(argv=None):
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default=os.environ.get("SCFG_A1111_URL", "http://127.0.0.1:7861"))
    ap.add_argument("--out", default="/work/scratch/quality/eval")
    ap.add_argument("--docs", default="docs", help="where the plot and the pictures go")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--seeds", type=int, default=4, help="images per prompt (seed, seed+1, ...)")
    ap.add_argument("--cfg", type=float, nargs="+", default=[1.0, 2.0, 3.0, 5.0, 7.5])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--levels", default="2,4",
                    help="S-CFG levels: latent/2 + latent/4 give the 16x16 mask grid at 256² that SD1.5's "
                         "default levels give at 512²")
    ap.add_argument("--region", default="foreground", choices=("foreground", "mean"),
                    help="S-CFG's benchmark region")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pictures", type=int, default=4)
    ap.add_argument("--picture-cfg", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    os.makedirs(a.out, exist_ok=True)
    client = Client(a.url)
    client.use_model(MODEL)
    prompts = data.eval_prompts(a.seed, a.prompts)
    runs = generate(client, a, prompts)
    net = features.load_or_train(os.path.join(a.out, "classifier.pt"), a.seed)
    held_out = [data.sample(a.seed, i, "heldout") for i in range(256)]
    print("classifier on held-out images:", features.accuracy(net, held_out))
    rows = score_configs(a, prompts, runs, net)
    with open(os.path.join(a.out, "rows.json"), "w") as fh:
        json.dump(rows, fh, indent=1)
    text = table(rows)
    with open(os.path.join(a.out, "table.md"), "w") as fh:
        fh.write(text)
    print(text)
    title = (f"{MODEL} (a small model trained here on synthetic shapes, not Stable Diffusion): "
             f"{a.prompts} held-out prompts x {a.seeds} seeds, Euler {a.steps} steps, "
             f"S-CFG levels {a.levels}, region {a.region}")
    plot(rows, os.path.join(a.docs, "quality-tradeoff.png"), title)
    if a.pictures:
        pictures(client, a, prompts, os.path.join(a.docs, "quality-pairs.png"))
    print("wrote", os.path.join(a.out, "table.md"), "and", a.docs)


if __name__ == "__main__":
    main()

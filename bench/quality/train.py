"""Train a small SD1.x-layout latent diffusion model on bench.quality.data (CPU, seeded, resumable).

Stages (one state file, WORK/state.pt, saved every --save-min minutes and at each stage's end):
  vae     AutoencoderKL f=8, 4 latent channels: by default set to 8x8 mean pooling / nearest upsampling
          (bench.quality.analytic_vae); --vae train learns it (L1 + 1e-6 KL, random 128² crops)
  calib   fold a scale into quant_conv/post_quant_conv so that latents * 0.18215 have unit std
          (the checkpoint then uses SD1.x's scale_factor, like any SD1.5 model)
  encode  cache posterior means of the first --n-images training images (latent 32²)
  unet    UNet2DConditionModel (SD1.x blocks) + CLIPTextModel, eps-prediction, scaled-linear
          DDPM schedule 0.00085-0.012, 10% captions dropped to "", EMA 0.999, AdamW with a
          cosine learning-rate decay over --unet-steps
Exported after each save: WORK/export/{vae,unet,text_encoder,tokenizer} (EMA weights, diffusers /
transformers folders) for convert.py and check.py.

    nice -n 10 python -m bench.quality.train --work /work/scratch/quality
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from bench.quality import analytic_vae, data
from tests.e2e import models as e2e

SCALE = 0.18215
TE = e2e.CLIPTextConfig(hidden_size=60, intermediate_size=240, num_hidden_layers=4, num_attention_heads=4)
# SD1.x blocks (4 levels, res blocks + down/upsamplers at the same places, cross-attention in the
# middle block) but one res block per level and no attention at latent/1: on one CPU thread the
# 1024-token self-attention there doubled the step time; S-CFG reads latent/4 and latent/8 only.
UNET = e2e.UNetConfig(model_channels=32, channel_mult=(1, 2, 4, 4), num_res_blocks=1,
                      attention_resolutions=(4, 2), num_heads=4, context_dim=TE.hidden_size)
# The VAE is set, not trained, by default (bench.quality.analytic_vae): 8x8 mean pooling / nearest.
VAE = e2e.VAEConfig(ch=analytic_vae.CH, ch_mult=(1, 1, 1, 1), num_res_blocks=1)


def build(tok_dir: str):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=VAE.z_channels,
                        down_block_types=("DownEncoderBlock2D",) * len(VAE.ch_mult),
                        up_block_types=("UpDecoderBlock2D",) * len(VAE.ch_mult),
                        block_out_channels=tuple(VAE.ch * m for m in VAE.ch_mult),
                        layers_per_block=VAE.num_res_blocks, norm_num_groups=32, sample_size=data.SIZE)
    chans = tuple(UNET.model_channels * m for m in UNET.channel_mult)
    attn = [2 ** i in UNET.attention_resolutions for i in range(len(chans))]
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in attn[::-1])
    unet = UNet2DConditionModel(
        sample_size=data.SIZE // 8, in_channels=4, out_channels=4, layers_per_block=UNET.num_res_blocks,
        block_out_channels=chans, down_block_types=down, up_block_types=up,
        cross_attention_dim=UNET.context_dim,
        attention_head_dim=UNET.num_heads,  # diffusers' SD1.x naming: this is the head count
        norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0)
    if not os.path.isfile(os.path.join(tok_dir, "vocab.json")):
        e2e.write_clip_tokenizer(tok_dir, None, TE)
    te = CLIPTextModel(CLIPTextConfig(**TE.hf_config()))
    return vae, unet, te, CLIPTokenizer.from_pretrained(tok_dir)


def n_params(m) -> int:
    return sum(p.numel() for p in m.parameters())


def schedule():
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def to_tensor(imgs: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1


def tokenize(tok, caps):
    return tok(caps, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def crops(imgs: np.ndarray, labs: np.ndarray, c: int, rng: np.random.Generator) -> np.ndarray:
    """c x c crops (8-px aligned) around a random object pixel, so each shows object and background:
    with 32 channels at full resolution the VAE's GroupNorm(32) is per channel, so a flat crop carries
    no colour through the decoder's last norm and cannot be learnt (full images always have an object)."""
    out = []
    for im, lab in zip(imgs, labs, strict=True):
        ys, xs = np.nonzero(lab)
        k = rng.integers(len(ys))
        corner = np.array([ys[k], xs[k]]) - c // 2 + rng.integers(-c // 4, c // 4 + 1, 2)
        oy, ox = np.clip(corner, 0, data.SIZE - c) // 8 * 8
        out.append(im[oy:oy + c, ox:ox + c])
    return np.stack(out)


def unet_lr(a, step: int) -> float:
    """Linear warm-up, then a cosine decay to a.lr_end at a.unet_steps, so that a run of a fixed length
    ends at a low rate (``--schedule constant``: the warm-up only, as the earlier runs)."""
    warm = min(1.0, (step + 1) / a.warmup)
    if a.schedule == "constant":
        return a.lr * warm
    progress = min(1.0, max(0.0, (step - a.warmup) / max(1, a.unet_steps - a.warmup)))
    return warm * (a.lr_end + (a.lr - a.lr_end) * 0.5 * (1 + math.cos(math.pi * progress)))


class Trainer:
    def __init__(self, a):
        self.a, self.work = a, a.work
        self.log_path = os.path.join(a.work, "train.log")
        torch.manual_seed(a.seed)
        self.vae, self.unet, self.te, self.tok = build(os.path.join(a.work, "tokenizer"))
        self.ema = None
        self.st = {"stage": "vae", "step": 0, "cpu_s": 0.0}
        self.opt = None
        self.path = os.path.join(a.work, "state.pt")
        if os.path.isfile(self.path):
            self.load()
        self.cpu_base = self.st["cpu_s"] - time.process_time()

    def log(self, msg: str):
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, flush=True)
        with open(self.log_path, "a") as fh:
            fh.write(line + "\n")

    # --- state -------------------------------------------------------------------------------
    def make_opt(self):
        if self.st["stage"] == "vae":
            self.opt = torch.optim.AdamW(self.vae.parameters(), lr=self.a.vae_lr, weight_decay=0.0)
        elif self.st["stage"] == "unet":
            params = list(self.unet.parameters()) + list(self.te.parameters())
            self.opt = torch.optim.AdamW(params, lr=self.a.lr, weight_decay=0.01)
            if self.ema is None:
                self.ema = self.new_ema()

    def new_ema(self):
        return copy.deepcopy(torch.nn.ModuleDict({"unet": self.unet, "te": self.te})).requires_grad_(False)

    def save(self):
        s = {"st": self.st, "vae": self.vae.state_dict(), "unet": self.unet.state_dict(),
             "te": self.te.state_dict(), "opt": self.opt.state_dict() if self.opt else None,
             "ema": self.ema.state_dict() if self.ema else None, "rng": torch.get_rng_state()}
        torch.save(s, self.path + ".tmp")
        os.replace(self.path + ".tmp", self.path)
        self.export()
        self.log(f"saved {self.path} stage={self.st['stage']} step={self.st['step']}")

    def load(self):
        s = torch.load(self.path, weights_only=False)
        self.st = s["st"]
        self.vae.load_state_dict(s["vae"])
        self.unet.load_state_dict(s["unet"])
        self.te.load_state_dict(s["te"])
        self.make_opt()
        if s["ema"] is not None:
            if self.ema is None:
                self.ema = self.new_ema()
            self.ema.load_state_dict(s["ema"])
        if s["opt"] is not None and self.opt is not None:
            self.opt.load_state_dict(s["opt"])
        torch.set_rng_state(s["rng"])
        self.log(f"resumed stage={self.st['stage']} step={self.st['step']}")

    def export(self):
        out = os.path.join(self.work, "export")
        self.vae.save_pretrained(os.path.join(out, "vae"))
        src = self.ema if self.ema is not None else {"unet": self.unet, "te": self.te}
        src["unet"].save_pretrained(os.path.join(out, "unet"))
        src["te"].save_pretrained(os.path.join(out, "text_encoder"))
        self.tok.save_pretrained(os.path.join(out, "tokenizer"))

    # --- stages ------------------------------------------------------------------------------
    def run(self):
        if self.opt is None:
            self.make_opt()
        self.t_save = time.time()
        while self.st["stage"] != "done":
            stage = self.st["stage"]
            getattr(self, "stage_" + stage)()
            if self.st["stage"] == stage:  # a stage returns having advanced the stage or hit the budget
                break

    def tick(self, t0: float):
        self.st["cpu_s"] = self.cpu_base + time.process_time()  # CPU seconds of all runs
        if time.time() - self.t_save > self.a.save_min * 60:
            self.save()
            self.t_save = time.time()

    def next_stage(self, stage: str):
        self.st.update(stage=stage, step=0)
        self.opt = None
        self.make_opt()
        self.save()

    def stage_vae(self):
        if self.a.vae == "analytic":
            analytic_vae.set_weights(self.vae)
            self.log("vae: analytic weights (8x8 mean pooling in, nearest upsampling out)")
            self.next_stage("calib")
            return
        a, vae = self.a, self.vae.train()
        c, recent = a.vae_crop, []
        while self.st["step"] < a.vae_steps:
            t0, i = time.time(), self.st["step"]
            imgs, labs, _ = data.batch(a.seed, i * a.vae_batch, a.vae_batch)
            x = to_tensor(crops(imgs, labs, c, np.random.default_rng([a.seed, i])))
            for pg in self.opt.param_groups:  # from the arguments, also on resume
                pg["lr"] = a.vae_lr
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample()).sample
            l1 = (rec - x).abs().mean()
            loss = l1 + 1e-6 * post.kl().mean()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.st["step"] += 1
            self.tick(t0)
            recent = [*recent[-19:], l1.item()]
            if i % 20 == 0:
                self.log(f"vae step {i} l1 {l1.item():.4f} mean20 {np.mean(recent):.4f} "
                         f"({(time.time() - t0):.2f}s/step, "
                         f"total cpu {self.st['cpu_s'] / 60:.1f} min)")
        self.next_stage("calib")

    def encode_mean(self, x: torch.Tensor) -> torch.Tensor:
        """Posterior means; the set VAE's by its closed form (the same numbers, far cheaper)."""
        if self.a.vae == "analytic":
            return analytic_vae.encode_mean(self.vae, x)
        return self.vae.encode(x).latent_dist.mean

    @torch.no_grad()
    def stage_calib(self):
        vae = self.vae.eval()
        imgs, _, _ = data.batch(self.a.seed, 10 ** 6, 64)
        x = to_tensor(imgs)
        z = torch.cat([self.encode_mean(x[i:i + 8]) for i in range(0, 64, 8)])
        n = 8 if self.a.vae == "analytic" else 64  # the set VAE's decoder runs 96 channels at 256²
        rec = torch.cat([vae.decode(z[i:i + 8]).sample for i in range(0, n, 8)])
        s = 1.0 / (SCALE * z.std().item())
        q, pq = vae.quant_conv, vae.post_quant_conv
        k = q.out_channels // 2  # moments = [mean, logvar]
        q.weight[:k] *= s
        q.bias[:k] *= s
        q.bias[k:] += 2 * math.log(s)
        pq.weight /= s
        z2 = self.encode_mean(x[:8])
        pair = torch.cat([x[:4], rec[:4]], 3).clamp(-1, 1).add(1).mul(127.5).byte()  # originals | recons
        from PIL import Image

        grid = torch.cat(list(pair), 1).permute(1, 2, 0).numpy()
        Image.fromarray(grid).save(os.path.join(self.work, "vae_recon.png"))
        self.tick(time.time())
        self.log(f"calib: latent std {z.std().item():.4f} -> scale {s:.4f}; now std*{SCALE} = "
                 f"{z2.std().item() * SCALE:.3f}, mean*{SCALE} = {z2.mean().item() * SCALE:.3f}; "
                 f"held-out recon L1 {(rec - x[:n]).abs().mean().item():.4f} (x in [-1,1])")
        self.next_stage("encode")

    @torch.no_grad()
    def stage_encode(self):
        a = self.a
        self.vae.eval()
        path = os.path.join(self.work, "latents.pt")
        zs, caps = [], []
        t0 = time.time()
        for start in range(0, a.n_images, 32):
            imgs, _, c = data.batch(a.seed, 2 * 10 ** 6 + start, min(32, a.n_images - start))
            zs.append((self.encode_mean(to_tensor(imgs)) * SCALE).half())
            caps += c
            if start % 1024 == 0:
                self.log(f"encode {start}/{a.n_images} ({time.time() - t0:.0f}s)")
        torch.save({"z": torch.cat(zs), "captions": caps}, path)
        self.tick(t0)
        self.next_stage("unet")

    def stage_unet(self):
        a = self.a
        d = torch.load(os.path.join(self.work, "latents.pt"))
        z_all, caps = d["z"], d["captions"]
        ids_all = tokenize(self.tok, caps)
        empty = tokenize(self.tok, [""])
        ac = schedule()
        unet, te = self.unet.train(), self.te.train()
        params = list(unet.parameters()) + list(te.parameters())
        t_start = time.time()
        recent = []
        while self.st["step"] < a.unet_steps:
            t0, i = time.time(), self.st["step"]
            g = torch.Generator().manual_seed(a.seed * 1000003 + i)
            idx = torch.randint(0, len(z_all), (a.batch,), generator=g)
            z0 = z_all[idx].float()
            ids = ids_all[idx].clone()
            drop = torch.rand(a.batch, generator=g) < a.drop
            ids[drop] = empty
            t = torch.randint(0, 1000, (a.batch,), generator=g)
            eps = torch.randn(z0.shape, generator=g)
            abar = ac[t].view(-1, 1, 1, 1)
            zt = abar.sqrt() * z0 + (1 - abar).sqrt() * eps
            for pg in self.opt.param_groups:
                pg["lr"] = unet_lr(a, i)
            pred = unet(zt, t, encoder_hidden_states=te(ids).last_hidden_state).sample
            loss = F.mse_loss(pred, eps)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            self.opt.step()
            with torch.no_grad():
                decay = min(a.ema, (1 + i) / (10 + i))
                for pe, p in zip(self.ema.parameters(), params, strict=True):
                    pe.lerp_(p, 1 - decay)
            self.st["step"] += 1
            self.tick(t0)
            recent = [*recent[-49:], loss.item()]
            if i % 25 == 0:
                self.log(f"unet step {i} loss {loss.item():.4f} mean50 {np.mean(recent):.4f} "
                         f"({time.time() - t0:.2f}s/step, "
                         f"total cpu {self.st['cpu_s'] / 60:.1f} min)")
            if a.max_min and time.time() - t_start > a.max_min * 60:
                self.log(f"time budget of this run reached ({a.max_min} min)")
                self.save()
                return
        self.next_stage("done")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/work/scratch/quality")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--save-min", type=float, default=5.0)
    ap.add_argument("--vae", choices=("analytic", "train"), default="analytic",
                    help="set the VAE's weights (analytic_vae) or learn them (--vae-steps ...)")
    ap.add_argument("--vae-steps", type=int, default=900)
    ap.add_argument("--vae-batch", type=int, default=4)
    ap.add_argument("--vae-crop", type=int, default=128)
    ap.add_argument("--vae-lr", type=float, default=3e-4)
    ap.add_argument("--n-images", type=int, default=2048)
    ap.add_argument("--unet-steps", type=int, default=6000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=4e-4)
    ap.add_argument("--lr-end", type=float, default=2e-5)
    ap.add_argument("--schedule", choices=("cosine", "constant"), default="cosine")
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--drop", type=float, default=0.1)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--max-min", type=float, default=0, help="stop this run after N minutes of UNet training")
    ap.add_argument("--sizes", action="store_true", help="print parameter counts and exit")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    os.makedirs(a.work, exist_ok=True)
    if a.sizes:
        vae, unet, te, _ = build(os.path.join(a.work, "tokenizer"))
        tot = 0
        for name, m in (("vae", vae), ("unet", unet), ("text_encoder", te)):
            tot += n_params(m)
            print(f"{name}: {n_params(m) / 1e6:.3f} M params, {n_params(m) * 2 / 1e6:.2f} MB fp16")
        print(f"total: {tot / 1e6:.3f} M params, {tot * 2 / 1e6:.2f} MB fp16")
        return
    Trainer(a).run()


if __name__ == "__main__":
    main()

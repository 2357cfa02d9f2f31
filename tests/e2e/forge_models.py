"""Random-weight SD1.5-topology checkpoints for end-to-end tests against
Stable Diffusion WebUI Forge (2025 backend).

Forge does not use a YAML config for SD1.5: it guesses the model family from
the *shapes* of the UNet weights in the state dict (``model_channels == 320``,
``context_dim == 768``, conv ``proj_in``, no ``label_emb``) and then builds
the text encoder and VAE from fixed Hugging Face configs that it ships under
``backend/huggingface/runwayml/stable-diffusion-v1-5/``.  Therefore:

* text encoder (``cond_stage_model.transformer.text_model.*``) and VAE
  (``first_stage_model.*``) must be full size — their configs are fixed;
* the UNet (``model.diffusion_model.*``) may be smaller, as long as the base
  channel count is 320 and cross-attention uses a 768-wide context.

The ``small`` UNet keeps the exact SD1.5 block layout (so block indices such as
``input_blocks.7/8``, ``middle_block``, ``output_blocks.3/4/5`` carry attention
at latent/4 and latent/8, like the real model) but uses 320 channels at every
level, which makes a denoising step several times cheaper on CPU.  ``full``
is the real SD1.5 UNet size (860M parameters).

All names follow the original (ldm/"CompVis") checkpoint layout; nothing here
is taken from Forge's code, only the numbers in its JSON configs are read.

CLI::

    python -m tests.e2e.forge_models --forge /path/to/forge --out model.safetensors \
        [--arch sd15|sdxl] [--unet small|full] [--seed N] [--dtype float16|float32]

``--arch sdxl`` writes an SDXL-topology checkpoint (``conditioner.embedders.0/1``
text encoders at full size, ~1.9 GB in float16); its ``small`` UNet has
attention at latent/2 (depth 1) and latent/4 (depth 2) plus the middle block,
the transformer depths Forge files under its SDXL family.

Only ``torch`` and ``safetensors`` are required.
"""
from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable

import torch

SD15_DIR = os.path.join("backend", "huggingface", "runwayml", "stable-diffusion-v1-5")

# Fallbacks (the public SD1.5 / CLIP ViT-L/14 numbers) used when no Forge
# folder is given or a config file is missing.
DEFAULT_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                    vocab_size=49408, max_position_embeddings=77)
DEFAULT_VAE = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                   latent_channels=4, in_channels=3, out_channels=3)
DEFAULT_UNET = dict(block_out_channels=[320, 640, 1280, 1280], layers_per_block=2,
                    cross_attention_dim=768, in_channels=4, out_channels=4,
                    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"])


def _read_config(forge: str | None, sub: str, default: dict, base: str = SD15_DIR) -> dict:
    cfg = dict(default)
    if forge:
        path = os.path.join(forge, base, sub, "config.json")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            for k in default:
                if k in data:
                    cfg[k] = data[k]
    return cfg


class _Builder:
    """Collects randomly initialised tensors under a key prefix."""

    def __init__(self, gen: torch.Generator, std: float, dtype: torch.dtype):
        self.sd: dict[str, torch.Tensor] = {}
        self.gen = gen
        self.std = std
        self.dtype = dtype

    def _randn(self, *shape: int, std: float | None = None) -> torch.Tensor:
        t = torch.randn(*shape, generator=self.gen, dtype=torch.float32)
        return (t * (self.std if std is None else std)).to(self.dtype)

    def weight(self, key: str, *shape: int, std: float | None = None) -> None:
        self.sd[key] = self._randn(*shape, std=std)

    def zeros(self, key: str, *shape: int) -> None:
        self.sd[key] = torch.zeros(*shape, dtype=self.dtype)

    def ones(self, key: str, *shape: int) -> None:
        self.sd[key] = torch.ones(*shape, dtype=self.dtype)

    # layers -----------------------------------------------------------------
    def linear(self, p: str, cin: int, cout: int, bias: bool = True) -> None:
        self.weight(p + ".weight", cout, cin)
        if bias:
            self.zeros(p + ".bias", cout)

    def conv(self, p: str, cin: int, cout: int, k: int) -> None:
        self.weight(p + ".weight", cout, cin, k, k)
        self.zeros(p + ".bias", cout)

    def norm(self, p: str, c: int) -> None:
        self.ones(p + ".weight", c)
        self.zeros(p + ".bias", c)


# --------------------------------------------------------------------------- #
# CLIP ViT-L/14 text encoder (transformers CLIPTextModel names)
# --------------------------------------------------------------------------- #
def add_clip_text(b: _Builder, prefix: str, cfg: dict) -> None:
    d, ff = cfg["hidden_size"], cfg["intermediate_size"]
    p = prefix + "text_model."
    b.weight(p + "embeddings.token_embedding.weight", cfg["vocab_size"], d)
    b.weight(p + "embeddings.position_embedding.weight", cfg["max_position_embeddings"], d, std=0.01)
    for i in range(cfg["num_hidden_layers"]):
        lp = f"{p}encoder.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            b.linear(lp + "self_attn." + n, d, d)
        b.norm(lp + "layer_norm1", d)
        b.norm(lp + "layer_norm2", d)
        b.linear(lp + "mlp.fc1", d, ff)
        b.linear(lp + "mlp.fc2", ff, d)
    b.norm(p + "final_layer_norm", d)


def add_open_clip_text(b: _Builder, prefix: str, cfg: dict) -> None:
    """OpenCLIP (ViT-bigG/14 text tower for SDXL) in open_clip's own names."""
    d, ff = cfg["hidden_size"], cfg["intermediate_size"]
    b.weight(prefix + "token_embedding.weight", cfg["vocab_size"], d)
    b.weight(prefix + "positional_embedding", cfg["max_position_embeddings"], d, std=0.01)
    for i in range(cfg["num_hidden_layers"]):
        lp = f"{prefix}transformer.resblocks.{i}."
        b.norm(lp + "ln_1", d)
        b.weight(lp + "attn.in_proj_weight", 3 * d, d)
        b.zeros(lp + "attn.in_proj_bias", 3 * d)
        b.linear(lp + "attn.out_proj", d, d)
        b.norm(lp + "ln_2", d)
        b.linear(lp + "mlp.c_fc", d, ff)
        b.linear(lp + "mlp.c_proj", ff, d)
    b.norm(prefix + "ln_final", d)
    b.weight(prefix + "text_projection", d, cfg.get("projection_dim", d))
    b.sd[prefix + "logit_scale"] = torch.tensor(4.6052, dtype=b.dtype)


# --------------------------------------------------------------------------- #
# KL-f8 autoencoder (ldm names)
# --------------------------------------------------------------------------- #
def _vae_resblock(b: _Builder, p: str, cin: int, cout: int) -> None:
    b.norm(p + "norm1", cin)
    b.conv(p + "conv1", cin, cout, 3)
    b.norm(p + "norm2", cout)
    b.conv(p + "conv2", cout, cout, 3)
    if cin != cout:
        b.conv(p + "nin_shortcut", cin, cout, 1)


def _vae_attn(b: _Builder, p: str, c: int) -> None:
    b.norm(p + "norm", c)
    for n in ("q", "k", "v", "proj_out"):
        b.conv(p + n, c, c, 1)


def _vae_mid(b: _Builder, p: str, c: int) -> None:
    _vae_resblock(b, p + "mid.block_1.", c, c)
    _vae_attn(b, p + "mid.attn_1.", c)
    _vae_resblock(b, p + "mid.block_2.", c, c)


def add_vae(b: _Builder, prefix: str, cfg: dict) -> None:
    chs: list[int] = list(cfg["block_out_channels"])
    nrb = cfg["layers_per_block"]
    z = cfg["latent_channels"]
    # encoder
    e = prefix + "encoder."
    b.conv(e + "conv_in", cfg["in_channels"], chs[0], 3)
    cin = chs[0]
    for i, cout in enumerate(chs):
        for j in range(nrb):
            _vae_resblock(b, f"{e}down.{i}.block.{j}.", cin, cout)
            cin = cout
        if i != len(chs) - 1:
            b.conv(f"{e}down.{i}.downsample.conv", cin, cin, 3)
    _vae_mid(b, e, cin)
    b.norm(e + "norm_out", cin)
    b.conv(e + "conv_out", cin, 2 * z, 3)
    # decoder
    d = prefix + "decoder."
    cin = chs[-1]
    b.conv(d + "conv_in", z, cin, 3)
    _vae_mid(b, d, cin)
    for i in reversed(range(len(chs))):
        cout = chs[i]
        for j in range(nrb + 1):
            _vae_resblock(b, f"{d}up.{i}.block.{j}.", cin, cout)
            cin = cout
        if i != 0:
            b.conv(f"{d}up.{i}.upsample.conv", cin, cin, 3)
    b.norm(d + "norm_out", cin)
    b.conv(d + "conv_out", cin, cfg["out_channels"], 3)
    b.conv(prefix + "quant_conv", 2 * z, 2 * z, 1)
    b.conv(prefix + "post_quant_conv", z, z, 1)


# --------------------------------------------------------------------------- #
# ldm UNetModel (SD1.x layout: conv proj_in/proj_out, GEGLU feed-forward)
# --------------------------------------------------------------------------- #
def _unet_resblock(b: _Builder, p: str, cin: int, cout: int, temb: int) -> None:
    b.norm(p + "in_layers.0", cin)
    b.conv(p + "in_layers.2", cin, cout, 3)
    b.linear(p + "emb_layers.1", temb, cout)
    b.norm(p + "out_layers.0", cout)
    b.conv(p + "out_layers.3", cout, cout, 3)
    if cin != cout:
        b.conv(p + "skip_connection", cin, cout, 1)


def _unet_transformer(b: _Builder, p: str, c: int, ctx: int, depth: int, linear: bool = False) -> None:
    b.norm(p + "norm", c)
    if linear:  # SD2/SDXL style: proj_in/proj_out are Linear layers
        b.linear(p + "proj_in", c, c)
    else:       # SD1 style: 1x1 convolutions
        b.conv(p + "proj_in", c, c, 1)
    for t in range(depth):
        tp = f"{p}transformer_blocks.{t}."
        for a, kv_dim in (("attn1", c), ("attn2", ctx)):
            b.linear(tp + a + ".to_q", c, c, bias=False)
            b.linear(tp + a + ".to_k", kv_dim, c, bias=False)
            b.linear(tp + a + ".to_v", kv_dim, c, bias=False)
            b.linear(tp + a + ".to_out.0", c, c)
        b.linear(tp + "ff.net.0.proj", c, c * 4 * 2)  # GEGLU
        b.linear(tp + "ff.net.2", c * 4, c)
        for n in ("norm1", "norm2", "norm3"):
            b.norm(tp + n, c)
    if linear:
        b.linear(p + "proj_out", c, c)
    else:
        b.conv(p + "proj_out", c, c, 1)


def add_unet(b: _Builder, prefix: str, channels: Iterable[int], depths: Iterable[int], nrb: int,
             ctx: int, cin_lat: int, cout_lat: int, middle_depth: int = 1, linear: bool = False,
             adm_in: int | None = None) -> None:
    """ldm ``UNetModel`` weights.  ``depths[level]`` is the number of transformer
    blocks after each res-block of that level (0: no attention there)."""
    chs = list(channels)
    depths = list(depths)
    mc = chs[0]
    temb = mc * 4
    b.linear(prefix + "time_embed.0", mc, temb)
    b.linear(prefix + "time_embed.2", temb, temb)
    if adm_in:  # SDXL: pooled text embedding + size/crop conditioning
        b.linear(prefix + "label_emb.0.0", adm_in, temb)
        b.linear(prefix + "label_emb.0.2", temb, temb)
    b.conv(prefix + "input_blocks.0.0", cin_lat, mc, 3)
    skip = [mc]
    ch = mc
    idx = 1
    for level, cout in enumerate(chs):
        for _ in range(nrb):
            p = f"{prefix}input_blocks.{idx}."
            _unet_resblock(b, p + "0.", ch, cout, temb)
            ch = cout
            if depths[level]:
                _unet_transformer(b, p + "1.", ch, ctx, depths[level], linear)
            skip.append(ch)
            idx += 1
        if level != len(chs) - 1:
            b.conv(f"{prefix}input_blocks.{idx}.0.op", ch, ch, 3)
            skip.append(ch)
            idx += 1
    _unet_resblock(b, prefix + "middle_block.0.", ch, ch, temb)
    _unet_transformer(b, prefix + "middle_block.1.", ch, ctx, middle_depth, linear)
    _unet_resblock(b, prefix + "middle_block.2.", ch, ch, temb)
    idx = 0
    for level in reversed(range(len(chs))):
        cout = chs[level]
        for i in range(nrb + 1):
            p = f"{prefix}output_blocks.{idx}."
            _unet_resblock(b, p + "0.", ch + skip.pop(), cout, temb)
            ch = cout
            layer = 1
            if depths[level]:
                _unet_transformer(b, f"{p}{layer}.", ch, ctx, depths[level], linear)
                layer += 1
            if level != 0 and i == nrb:
                b.conv(f"{p}{layer}.conv", ch, ch, 3)
            idx += 1
    b.norm(prefix + "out.0", ch)
    b.conv(prefix + "out.2", ch, cout_lat, 3)


def unet_layout(forge: str | None, size: str) -> dict:
    cfg = _read_config(forge, "unet", DEFAULT_UNET)
    full = list(cfg["block_out_channels"])
    attn_levels = [i for i, t in enumerate(cfg["down_block_types"]) if t.startswith("CrossAttn")]
    if size == "full":
        chans = full
    elif size == "small":
        # Same block indices as SD1.5, base width everywhere.  The base width
        # must stay at 320: Forge identifies SD1.5 by model_channels == 320.
        chans = [full[0]] * len(full)
    else:
        raise ValueError(f"unknown UNet size {size!r}")
    depths = [1 if i in attn_levels else 0 for i in range(len(chans))]
    return dict(channels=chans, depths=depths, nrb=cfg["layers_per_block"],
                ctx=cfg["cross_attention_dim"], cin_lat=cfg["in_channels"],
                cout_lat=cfg["out_channels"])


def build_sd15_state_dict(forge: str | None = None, unet: str = "small", seed: int = 0,
                          std: float = 0.02, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    b = _Builder(gen, std, dtype)
    add_unet(b, "model.diffusion_model.", **unet_layout(forge, unet))
    add_clip_text(b, "cond_stage_model.transformer.", _read_config(forge, "text_encoder", DEFAULT_TEXT))
    add_vae(b, "first_stage_model.", _read_config(forge, "vae", DEFAULT_VAE))
    return b.sd


SDXL_DIR = os.path.join("backend", "huggingface", "stabilityai", "stable-diffusion-xl-base-1.0")
DEFAULT_TEXT_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                      vocab_size=49408, max_position_embeddings=77, projection_dim=1280)
DEFAULT_SDXL_UNET = dict(block_out_channels=[320, 640, 1280], layers_per_block=2,
                         cross_attention_dim=2048, in_channels=4, out_channels=4,
                         transformer_layers_per_block=[1, 2, 10],
                         down_block_types=["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 2,
                         projection_class_embeddings_input_dim=2816)


def sdxl_unet_layout(forge: str | None, size: str) -> dict:
    cfg = _read_config(forge, "unet", DEFAULT_SDXL_UNET, SDXL_DIR)
    full = list(cfg["block_out_channels"])
    tl = cfg["transformer_layers_per_block"]
    tl = list(tl) if isinstance(tl, (list, tuple)) else [tl] * len(full)
    kinds = cfg["down_block_types"]
    full_depths = [d if t.startswith("CrossAttn") else 0 for d, t in zip(tl, kinds, strict=True)]
    if size == "full":
        chans, depths, mid = full, full_depths, full_depths[-1]
    elif size == "small":
        # Forge maps input transformer depths [0,0,1,1,2,2] (Segmind-Vega-like,
        # a subclass of its SDXL guess) to the SDXL engine; 320 wide everywhere.
        chans, depths, mid = [full[0]] * len(full), [0, 1, 2][:len(full)], 1
    else:
        raise ValueError(f"unknown UNet size {size!r}")
    return dict(channels=chans, depths=depths, middle_depth=mid, nrb=cfg["layers_per_block"],
                ctx=cfg["cross_attention_dim"], cin_lat=cfg["in_channels"], cout_lat=cfg["out_channels"],
                linear=True, adm_in=cfg["projection_class_embeddings_input_dim"])


def build_sdxl_state_dict(forge: str | None = None, unet: str = "small", seed: int = 0,
                          std: float = 0.02, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """SDXL-topology checkpoint in the original (sgm) names: ``model.diffusion_model.*``,
    ``conditioner.embedders.0.transformer.text_model.*`` (CLIP-L),
    ``conditioner.embedders.1.model.*`` (OpenCLIP bigG), ``first_stage_model.*``."""
    gen = torch.Generator().manual_seed(seed)
    b = _Builder(gen, std, dtype)
    add_unet(b, "model.diffusion_model.", **sdxl_unet_layout(forge, unet))
    text_l = _read_config(forge, "text_encoder", DEFAULT_TEXT, SDXL_DIR)
    text_g = _read_config(forge, "text_encoder_2", DEFAULT_TEXT_G, SDXL_DIR)
    add_clip_text(b, "conditioner.embedders.0.transformer.", text_l)
    add_open_clip_text(b, "conditioner.embedders.1.model.", text_g)
    add_vae(b, "first_stage_model.", _read_config(forge, "vae", DEFAULT_VAE, SDXL_DIR))
    return b.sd


def write_checkpoint(out: str, forge: str | None = None, arch: str = "sd15", unet: str = "small",
                     seed: int = 0, std: float = 0.02, dtype: torch.dtype = torch.float16) -> str:
    from safetensors.torch import save_file

    build = {"sd15": build_sd15_state_dict, "sdxl": build_sdxl_state_dict}[arch]
    sd = build(forge, unet=unet, seed=seed, std=std, dtype=dtype)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    # A single metadata entry: safetensors writes a multi-key metadata map in a
    # per-process random order, which would make the file (and so the model
    # hash the WebUI reports) differ between otherwise identical runs.
    save_file(sd, tmp, metadata={"format": "pt"})
    os.replace(tmp, out)
    return out


def write_sd15_checkpoint(out: str, forge: str | None = None, unet: str = "small", seed: int = 0,
                          std: float = 0.02, dtype: torch.dtype = torch.float16) -> str:
    return write_checkpoint(out, forge, "sd15", unet, seed, std, dtype)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--forge", help="Forge checkout (reads backend/huggingface/... configs); optional")
    ap.add_argument("--out", required=True, help="output .safetensors path")
    ap.add_argument("--arch", choices=["sd15", "sdxl"], default="sd15")
    ap.add_argument("--unet", choices=["small", "full"], default="small")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--std", type=float, default=0.02)
    ap.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    args = ap.parse_args(argv)
    path = write_checkpoint(args.out, args.forge, arch=args.arch, unet=args.unet, seed=args.seed,
                            std=args.std, dtype=getattr(torch, args.dtype))
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

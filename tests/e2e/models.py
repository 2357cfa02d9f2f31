"""Random-weight Stable Diffusion checkpoints for end-to-end tests.

Pure torch + safetensors (no WebUI, no transformers, no network).  Writes
checkpoints that use the original (CompVis / ldm) key layout, so a real
WebUI loads them like any SD1.5 / SDXL checkpoint, plus the yaml config beside
each checkpoint and a local CLIP tokenizer/text-config folder that the yaml
points at (the tokenizer is built from the BPE vocabulary shipped with the
``open-clip-torch`` package, or from ``--bpe PATH``).

CLI::

    python -m tests.e2e.models --out DIR [--kind sd15|sd2|sdxl|lora|controlnet|all] [--unet PRESET]
        [--prediction eps|v] [--ztsnr] [--full-te-vae] [--sdxl-full-te-vae] [--model-channels N]
        [--name NAME] [--dtype float16|float32]

``sd15``  -> DIR/scfg-tiny-sd15.safetensors + .yaml (+ DIR/clip-tokenizer/)
``sd2``   -> DIR/scfg-tiny-sd2.safetensors + .yaml (``--prediction v``: scfg-tiny-sd2-v)
``sdxl``  -> DIR/scfg-tiny-sdxl.safetensors + .yaml (+ DIR/clip-tokenizer/; ``--prediction v``:
             scfg-tiny-sdxl-v, with ``--ztsnr`` scfg-tiny-sdxl-v-ztsnr)
``lora``  -> DIR/scfg-tiny-lora.safetensors (kohya-style LoRA for the sd15 model)
``controlnet`` -> DIR/scfg-tiny-sd15-controlnet.safetensors (ldm ``cldm.ControlNet`` for the sd15 UNet)

``lora`` and ``controlnet`` follow the UNet chosen by ``--unet``/``--model-channels``, so they fit the
checkpoint written with the same options (e.g. ``--unet forge-sd15-small``).  sd-webui-controlnet (A1111)
builds every SD1.x control model as the full-width SD1.5 ControlNet (model_channels 320, channel_mult
[1,2,4,4]), so its control model and checkpoint need ``--model-channels 320``; Forge reads the layout from
the weights.

Architecture of the default SD1.5 model: the SD1.5 UNet layout (same block
indices: channel_mult [1,2,4,4], 2 res blocks per level, cross-attention at
downsample factors 1,2,4 = attention_resolutions [4,2,1], 8 heads, context 768)
but model_channels 64; VAE with ch 32; CLIP-L text encoder with 2 layers.

WebUI Forge ignores the yaml: it guesses the family from the UNet weight shapes
(model_channels 320, context 768 or 2048, transformer depths) and builds the
text encoders and VAE from fixed configs, so those must be full size:

* ``--kind sd15 --full-te-vae --unet forge-sd15-small``: full CLIP-L (12 layers)
  and SD VAE (ch 128), SD1.5 block layout at 320 channels on every level;
  ``--full-te-vae --model-channels 320``: the real SD1.5 size (860M UNet);
* ``--kind sdxl --sdxl-full-te-vae --unet forge-sdxl-small``: full CLIP-L under
  ``conditioner.embedders.0``, OpenCLIP ViT-bigG text tower (32 layers) under
  ``conditioner.embedders.1``, SD VAE (ch 128; ~1.8 GB in float16 before the
  UNet); ``--unet sdxl-base``: the real SDXL base UNet;
* ``--kind sd2 --full-te-vae --unet forge-sd2-small``: SD VAE (ch 128), SD2 block layout at 320 channels
  on every level (Forge takes SD2 by model_channels 320, context 1024, linear proj_in).

SD2.x (``--kind sd2``): the OpenCLIP ViT-H-14 text tower under ``cond_stage_model.model.`` always at full
size (24 layers, width 1024: A1111 builds ``open_clip`` ViT-H-14 from the yaml's FrozenOpenCLIPEmbedder,
Forge a fixed 23-layer CLIPTextModel), a UNet with context 1024, head width 64 and linear projections
(``sd2-small``: model_channels 64; ``sd2-base``: the real SD2.x UNet), VAE as for sd15. No tokenizer
folder: both hosts tokenize SD2 with OpenCLIP's own BPE.

Prediction type (``--prediction v``, ``--ztsnr``), written so that every host reads it:

* the yaml: SD2 ``parameterization: "v"`` (Stability's v2-inference-v.yaml), SDXL ``VScaling`` /
  ``VWeighting`` (A1111 reads only the yaml: sd_models_config.py, sd_models_xl.py ``extend_sdxl``;
  Forge's backend/loader.py reads it first too);
* SD2: the std of ``output_blocks.11.1.transformer_blocks.0.norm1.bias`` (huggingface_guess / ComfyUI:
  > 0.09 is v): N(0, 0.2) for v, zeros for eps;
* empty ``v_pred`` / ``ztsnr`` tensors in the state dict (Forge, Neo, reForge, Classic for SDXL; Classic
  also for SD2). A1111 reads no ztsnr marker: it needs Settings > Noise schedule "Zero Terminal SNR".
"""
from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

Shape = tuple[int, ...]
Spec = dict[str, Shape]

MAX_LENGTH = 77
CLIP_VOCAB_SIZE = 49408
SD15_NAME = "scfg-tiny-sd15"
SDXL_NAME = "scfg-tiny-sdxl"
SD2_NAME = "scfg-tiny-sd2"
LORA_NAME = "scfg-tiny-lora"
CONTROLNET_NAME = SD15_NAME + "-controlnet"
TOKENIZER_DIR = "clip-tokenizer"


# ---------------------------------------------------------------------------
# key/shape specs
# ---------------------------------------------------------------------------

def _gn(spec: Spec, p: str, c: int) -> None:
    spec[p + ".weight"] = (c,)
    spec[p + ".bias"] = (c,)


def _conv(spec: Spec, p: str, cin: int, cout: int, k: int = 3, bias: bool = True) -> None:
    spec[p + ".weight"] = (cout, cin, k, k)
    if bias:
        spec[p + ".bias"] = (cout,)


def _lin(spec: Spec, p: str, cin: int, cout: int, bias: bool = True) -> None:
    spec[p + ".weight"] = (cout, cin)
    if bias:
        spec[p + ".bias"] = (cout,)


@dataclass
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 64
    num_res_blocks: int = 2
    channel_mult: Sequence[int] = (1, 2, 4, 4)
    attention_resolutions: Sequence[int] = (4, 2, 1)
    num_heads: int = 8  # sd15 style (fixed head count)
    num_head_channels: int = -1  # sdxl style (fixed head width), overrides num_heads
    transformer_depth: Sequence[int] = (1, 1, 1, 1)
    transformer_depth_middle: int = 1
    context_dim: int = 768
    use_linear_in_transformer: bool = False
    adm_in_channels: int | None = None  # sdxl: label_emb input size


def _unet_resblock(spec: Spec, p: str, cin: int, cout: int, emb: int) -> None:
    _gn(spec, p + ".in_layers.0", cin)
    _conv(spec, p + ".in_layers.2", cin, cout)
    _lin(spec, p + ".emb_layers.1", emb, cout)
    _gn(spec, p + ".out_layers.0", cout)
    _conv(spec, p + ".out_layers.3", cout, cout)
    if cin != cout:
        _conv(spec, p + ".skip_connection", cin, cout, k=1)


def _unet_transformer(spec: Spec, p: str, c: int, depth: int, ctx: int, linear: bool) -> None:
    inner = c
    _gn(spec, p + ".norm", c)
    if linear:
        _lin(spec, p + ".proj_in", c, inner)
    else:
        _conv(spec, p + ".proj_in", c, inner, k=1)
    for d in range(depth):
        b = f"{p}.transformer_blocks.{d}"
        for a, kv in (("attn1", inner), ("attn2", ctx)):
            _lin(spec, f"{b}.{a}.to_q", inner, inner, bias=False)
            _lin(spec, f"{b}.{a}.to_k", kv, inner, bias=False)
            _lin(spec, f"{b}.{a}.to_v", kv, inner, bias=False)
            _lin(spec, f"{b}.{a}.to_out.0", inner, inner)
        _lin(spec, f"{b}.ff.net.0.proj", inner, inner * 4 * 2)  # GEGLU
        _lin(spec, f"{b}.ff.net.2", inner * 4, inner)
        for n in ("norm1", "norm2", "norm3"):
            _gn(spec, f"{b}.{n}", inner)
    if linear:
        _lin(spec, p + ".proj_out", inner, c)
    else:
        _conv(spec, p + ".proj_out", inner, c, k=1)


def unet_spec(cfg: UNetConfig, prefix: str = "model.diffusion_model.") -> Spec:
    """Keys/shapes of ldm/sgm ``openaimodel.UNetModel`` (legacy=False)."""
    s: Spec = {}
    mc = cfg.model_channels
    emb = mc * 4
    _lin(s, prefix + "time_embed.0", mc, emb)
    _lin(s, prefix + "time_embed.2", emb, emb)
    if cfg.adm_in_channels:
        _lin(s, prefix + "label_emb.0.0", cfg.adm_in_channels, emb)
        _lin(s, prefix + "label_emb.0.2", emb, emb)
    _conv(s, prefix + "input_blocks.0.0", cfg.in_channels, mc)
    chans = [mc]
    ch = mc
    ds = 1
    idx = 1
    nlev = len(cfg.channel_mult)
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            p = f"{prefix}input_blocks.{idx}"
            _unet_resblock(s, p + ".0", ch, mult * mc, emb)
            ch = mult * mc
            if ds in cfg.attention_resolutions and cfg.transformer_depth[level] > 0:
                _unet_transformer(s, p + ".1", ch, cfg.transformer_depth[level], cfg.context_dim,
                                  cfg.use_linear_in_transformer)
            chans.append(ch)
            idx += 1
        if level != nlev - 1:
            _conv(s, f"{prefix}input_blocks.{idx}.0.op", ch, ch)
            chans.append(ch)
            ds *= 2
            idx += 1
    _unet_resblock(s, prefix + "middle_block.0", ch, ch, emb)
    _unet_transformer(s, prefix + "middle_block.1", ch, cfg.transformer_depth_middle, cfg.context_dim,
                      cfg.use_linear_in_transformer)
    _unet_resblock(s, prefix + "middle_block.2", ch, ch, emb)
    idx = 0
    for level, mult in list(enumerate(cfg.channel_mult))[::-1]:
        for i in range(cfg.num_res_blocks + 1):
            p = f"{prefix}output_blocks.{idx}"
            ich = chans.pop()
            _unet_resblock(s, p + ".0", ch + ich, mc * mult, emb)
            ch = mc * mult
            n = 1
            if ds in cfg.attention_resolutions and cfg.transformer_depth[level] > 0:
                _unet_transformer(s, f"{p}.{n}", ch, cfg.transformer_depth[level], cfg.context_dim,
                                  cfg.use_linear_in_transformer)
                n += 1
            if level and i == cfg.num_res_blocks:
                _conv(s, f"{p}.{n}.conv", ch, ch)
                ds //= 2
            idx += 1
    _gn(s, prefix + "out.0", mc)
    _conv(s, prefix + "out.2", mc, cfg.out_channels)
    return s


@dataclass
class VAEConfig:
    ch: int = 32
    ch_mult: Sequence[int] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    in_channels: int = 3
    out_ch: int = 3


def _vae_resblock(spec: Spec, p: str, cin: int, cout: int) -> None:
    _gn(spec, p + ".norm1", cin)
    _conv(spec, p + ".conv1", cin, cout)
    _gn(spec, p + ".norm2", cout)
    _conv(spec, p + ".conv2", cout, cout)
    if cin != cout:
        _conv(spec, p + ".nin_shortcut", cin, cout, k=1)


def _vae_attn(spec: Spec, p: str, c: int) -> None:
    _gn(spec, p + ".norm", c)
    for n in ("q", "k", "v", "proj_out"):
        _conv(spec, f"{p}.{n}", c, c, k=1)


def vae_spec(cfg: VAEConfig, prefix: str = "first_stage_model.") -> Spec:
    """Keys/shapes of ldm ``AutoencoderKL`` (attn_resolutions = [])."""
    s: Spec = {}
    ch, mult = cfg.ch, list(cfg.ch_mult)
    e = prefix + "encoder."
    _conv(s, e + "conv_in", cfg.in_channels, ch)
    in_mult = [1, *mult]
    bi = ch
    for lvl in range(len(mult)):
        bi, bo = ch * in_mult[lvl], ch * mult[lvl]
        for j in range(cfg.num_res_blocks):
            _vae_resblock(s, f"{e}down.{lvl}.block.{j}", bi, bo)
            bi = bo
        if lvl != len(mult) - 1:
            _conv(s, f"{e}down.{lvl}.downsample.conv", bi, bi)
    _vae_resblock(s, e + "mid.block_1", bi, bi)
    _vae_attn(s, e + "mid.attn_1", bi)
    _vae_resblock(s, e + "mid.block_2", bi, bi)
    _gn(s, e + "norm_out", bi)
    _conv(s, e + "conv_out", bi, 2 * cfg.z_channels)
    d = prefix + "decoder."
    bi = ch * mult[-1]
    _conv(s, d + "conv_in", cfg.z_channels, bi)
    _vae_resblock(s, d + "mid.block_1", bi, bi)
    _vae_attn(s, d + "mid.attn_1", bi)
    _vae_resblock(s, d + "mid.block_2", bi, bi)
    for lvl in reversed(range(len(mult))):
        bo = ch * mult[lvl]
        for j in range(cfg.num_res_blocks + 1):
            _vae_resblock(s, f"{d}up.{lvl}.block.{j}", bi, bo)
            bi = bo
        if lvl != 0:
            _conv(s, f"{d}up.{lvl}.upsample.conv", bi, bi)
    _gn(s, d + "norm_out", bi)
    _conv(s, d + "conv_out", bi, cfg.out_ch)
    _conv(s, prefix + "quant_conv", 2 * cfg.z_channels, 2 * cfg.embed_dim, k=1)
    _conv(s, prefix + "post_quant_conv", cfg.embed_dim, cfg.z_channels, k=1)
    return s


@dataclass
class CLIPTextConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 2
    num_attention_heads: int = 12
    vocab_size: int = CLIP_VOCAB_SIZE
    max_position_embeddings: int = MAX_LENGTH
    hidden_act: str = "quick_gelu"
    projection_dim: int = 768
    with_projection: bool = False  # CLIPTextModelWithProjection (SDXL's second encoder)

    def hf_config(self) -> dict:
        return {
            "_name_or_path": "scfg-tiny-clip-text",
            "architectures": ["CLIPTextModelWithProjection" if self.with_projection else "CLIPTextModel"],
            "model_type": "clip_text_model",
            "attention_dropout": 0.0,
            "bos_token_id": 0,
            "eos_token_id": 2,
            "pad_token_id": 1,
            "dropout": 0.0,
            "hidden_act": self.hidden_act,
            "hidden_size": self.hidden_size,
            "initializer_factor": 1.0,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "layer_norm_eps": 1e-05,
            "max_position_embeddings": self.max_position_embeddings,
            "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": self.num_hidden_layers,
            "projection_dim": self.projection_dim,
            "torch_dtype": "float32",
            "vocab_size": self.vocab_size,
        }


def clip_text_spec(cfg: CLIPTextConfig, prefix: str = "cond_stage_model.transformer.text_model.") -> Spec:
    """Keys/shapes of ``transformers.CLIPTextModel``'s ``text_model``."""
    s: Spec = {}
    h, f = cfg.hidden_size, cfg.intermediate_size
    s[prefix + "embeddings.token_embedding.weight"] = (cfg.vocab_size, h)
    s[prefix + "embeddings.position_embedding.weight"] = (cfg.max_position_embeddings, h)
    for i in range(cfg.num_hidden_layers):
        p = f"{prefix}encoder.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            _lin(s, p + "self_attn." + n, h, h)
        _gn(s, p + "layer_norm1", h)
        _gn(s, p + "layer_norm2", h)
        _lin(s, p + "mlp.fc1", h, f)
        _lin(s, p + "mlp.fc2", f, h)
    _gn(s, prefix + "final_layer_norm", h)
    return s


# ---------------------------------------------------------------------------
# tensor generation
# ---------------------------------------------------------------------------

def _is_norm(key: str) -> bool:
    return any(t in key for t in (".norm", "norm1", "norm2", "norm3", "layer_norm", "norm_out",
                                  "in_layers.0.", "out_layers.0.", "out.0.", "final_layer_norm", ".ln_1.",
                                  ".ln_2.", "ln_final"))


TEXT_FINAL_NORM_BIASES = ("final_layer_norm.bias", "ln_final.bias")


def random_tensors(spec: Spec, seed: int = 0, std: float = 0.02,
                   dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """Small random weights: N(0, std) for weights, 0 for biases, 1/0 for norms (the text
    encoders' final norm: a bias of mean 0.25; the VAE's posterior log-variance: -30)."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key in sorted(spec):
        shape = spec[key]
        if key.endswith(TEXT_FINAL_NORM_BIASES):
            # A real text encoder's last LayerNorm has a bias, so its outputs have a non-zero mean;
            # A1111's default emphasis rescales each chunk by old_mean/new_mean (0/0 without it).
            t = 0.25 + 0.5 * torch.randn(shape, generator=g)
        elif _is_norm(key) and len(shape) == 1:
            t = torch.ones(shape) if key.endswith(".weight") else torch.zeros(shape)
        elif key.split(".")[-2:] == ["quant_conv", "bias"]:
            # A trained VAE's posterior is nearly a point (log-variance near ldm's clamp of -30):
            # the WebUIs sample it with the global RNG when encoding for img2img, so a variance
            # of 1 would make img2img depend on whatever ran before.
            t = torch.zeros(shape)
            t[shape[0] // 2:] = -30.0
        elif key.endswith(".bias"):
            t = torch.zeros(shape)
        else:
            t = torch.randn(shape, generator=g) * std
        out[key] = t.to(dtype).contiguous()
    return out


def ddpm_schedule_buffers(timesteps: int = 1000, linear_start: float = 0.00085,
                          linear_end: float = 0.012) -> dict[str, torch.Tensor]:
    """The schedule buffers ldm's ``DDPM.register_schedule`` stores (float32)."""
    betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=torch.float64) ** 2
    alphas = 1.0 - betas
    ac = torch.cumprod(alphas, dim=0)
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    bufs = {
        "betas": betas,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": ac.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - ac).log(),
        "sqrt_recip_alphas_cumprod": (1.0 / ac).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1).sqrt(),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": torch.clamp(post_var, min=1e-20).log(),
        "posterior_mean_coef1": betas * ac_prev.sqrt() / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac),
    }
    return {k: v.to(torch.float32) for k, v in bufs.items()}


# ---------------------------------------------------------------------------
# tokenizer files
# ---------------------------------------------------------------------------

def find_bpe_vocab() -> str:
    """Locate CLIP's ``bpe_simple_vocab_16e6.txt.gz`` in an installed package."""
    import importlib.util

    for mod in ("open_clip", "clip"):
        try:
            spec = importlib.util.find_spec(mod)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            continue
        for loc in spec.submodule_search_locations:
            p = os.path.join(loc, "bpe_simple_vocab_16e6.txt.gz")
            if os.path.isfile(p):
                return p
    raise FileNotFoundError(
        "bpe_simple_vocab_16e6.txt.gz not found: install open-clip-torch (or clip-anytorch) "
        "or pass --bpe PATH")


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def write_clip_tokenizer(out_dir: str, bpe_path: str | None = None,
                         text_cfg: CLIPTextConfig | None = None, pad_token: str = "<|endoftext|>") -> str:
    """Write a HF CLIPTokenizer folder (vocab.json, merges.txt, configs) + text config.json."""
    bpe_path = bpe_path or find_bpe_vocab()
    os.makedirs(out_dir, exist_ok=True)
    with gzip.open(bpe_path, "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    encoder = {tok: i for i, tok in enumerate(vocab)}
    assert len(encoder) == CLIP_VOCAB_SIZE, len(encoder)
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as fh:
        json.dump(encoder, fh, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as fh:
        fh.write("#version: 0.2\n")
        fh.write("\n".join(" ".join(m) for m in merges))
        fh.write("\n")
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad_token,
    }
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as fh:
        json.dump(special, fh, indent=2)
    tok_cfg = dict(special)
    tok_cfg.update({
        "add_prefix_space": False,
        "do_lower_case": True,
        "errors": "replace",
        "model_max_length": MAX_LENGTH,
        "name_or_path": "scfg-tiny-clip",
        "tokenizer_class": "CLIPTokenizer",
    })
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as fh:
        json.dump(tok_cfg, fh, indent=2)
    with open(os.path.join(out_dir, "config.json"), "w") as fh:
        json.dump((text_cfg or CLIPTextConfig()).hf_config(), fh, indent=2)
    return out_dir


# ---------------------------------------------------------------------------
# yaml
# ---------------------------------------------------------------------------

def _vae_params_yaml(vae, extra: str = "") -> str:
    """The first_stage_config params block shared by the ldm (SD1) and sgm (SDXL) configs."""
    extra_line = f"\n          {extra}" if extra else ""
    return f"""        embed_dim: {vae.embed_dim}
        monitor: val/rec_loss
        ddconfig:{extra_line}
          double_z: true
          z_channels: {vae.z_channels}
          resolution: 256
          in_channels: {vae.in_channels}
          out_ch: {vae.out_ch}
          ch: {vae.ch}
          ch_mult: {_ylist(vae.ch_mult)}
          num_res_blocks: {vae.num_res_blocks}
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity
"""


def _unet_params_yaml(unet) -> str:
    """The UNet size lines shared by the ldm (SD1) and sgm (SDXL) configs."""
    return f"""        in_channels: {unet.in_channels}
        out_channels: {unet.out_channels}
        model_channels: {unet.model_channels}
        attention_resolutions: {_ylist(unet.attention_resolutions)}
        num_res_blocks: {unet.num_res_blocks}
        channel_mult: {_ylist(unet.channel_mult)}"""


def _ylist(xs: Iterable) -> str:
    return "[" + ", ".join(str(x) for x in xs) + "]"


def sd15_yaml(unet: UNetConfig, vae: VAEConfig, clip_dir: str) -> str:
    return f"""# Random-weight SD1.5-topology test model (generated by tests/e2e/models.py)
model:
  base_learning_rate: 1.0e-04
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.00085
    linear_end: 0.0120
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: "jpg"
    cond_stage_key: "txt"
    image_size: 64
    channels: 4
    cond_stage_trainable: false
    conditioning_key: crossattn
    monitor: val/loss_simple_ema
    scale_factor: 0.18215
    use_ema: False

    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 32 # unused
{_unet_params_yaml(unet)}
        num_heads: {unet.num_heads}
        use_spatial_transformer: True
        transformer_depth: {unet.transformer_depth[0]}
        context_dim: {unet.context_dim}
        use_checkpoint: False
        legacy: False

    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
{_vae_params_yaml(vae)}
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder
      params:
        version: {json.dumps(os.path.abspath(clip_dir))}
"""


def sd2_yaml(unet: UNetConfig, vae: VAEConfig, prediction: str = "eps") -> str:
    """Stability's v2-inference.yaml (eps) / v2-inference-v.yaml (``parameterization: "v"``) at our sizes."""
    param = '\n    parameterization: "v"' if prediction == "v" else ""
    return f"""# Random-weight SD2.x-topology test model, {prediction}-prediction (tests/e2e/models.py)
model:
  base_learning_rate: 1.0e-4
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:{param}
    linear_start: 0.00085
    linear_end: 0.0120
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: "jpg"
    cond_stage_key: "txt"
    image_size: 64
    channels: 4
    cond_stage_trainable: false
    conditioning_key: crossattn
    monitor: val/loss_simple_ema
    scale_factor: 0.18215
    use_ema: False

    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        use_checkpoint: False
        image_size: 32 # unused
{_unet_params_yaml(unet)}
        num_head_channels: {unet.num_head_channels}
        use_spatial_transformer: True
        use_linear_in_transformer: True
        transformer_depth: {unet.transformer_depth[0]}
        context_dim: {unet.context_dim}
        legacy: False

    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
{_vae_params_yaml(vae)}
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder
      params:
        freeze: True
        layer: "penultimate"
"""


def sdxl_yaml(unet: UNetConfig, vae: VAEConfig, clip_dir: str, clip_layers: int = 12,
              prediction: str = "eps") -> str:
    scaling = "V" if prediction == "v" else "Eps"  # A1111's extend_sdxl: VScaling -> parameterization "v"
    note = "" if prediction == "eps" else f", {prediction}-prediction"
    return f"""# Random-weight SDXL-topology test model (generated by tests/e2e/models.py){note}
model:
  target: sgm.models.diffusion.DiffusionEngine
  params:
    scale_factor: 0.13025
    disable_first_stage_autocast: True

    denoiser_config:
      target: sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser
      params:
        num_idx: 1000

        weighting_config:
          target: sgm.modules.diffusionmodules.denoiser_weighting.{scaling}Weighting
        scaling_config:
          target: sgm.modules.diffusionmodules.denoiser_scaling.{scaling}Scaling
        discretization_config:
          target: sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization

    network_config:
      target: sgm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        adm_in_channels: {unet.adm_in_channels}
        num_classes: sequential
        use_checkpoint: False
{_unet_params_yaml(unet)}
        num_head_channels: {unet.num_head_channels}
        use_spatial_transformer: True
        use_linear_in_transformer: True
        transformer_depth: {_ylist(unet.transformer_depth)}
        context_dim: {unet.context_dim}
        spatial_transformer_attn_type: softmax-xformers
        legacy: False

    conditioner_config:
      target: sgm.modules.GeneralConditioner
      params:
        emb_models:
          - is_trainable: False
            input_key: txt
            target: sgm.modules.encoders.modules.FrozenCLIPEmbedder
            params:
              version: {json.dumps(os.path.abspath(clip_dir))}
              layer: hidden
              layer_idx: {clip_layers - 1}
          - is_trainable: False
            input_key: txt
            target: sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2
            params:
              arch: ViT-bigG-14
              version: laion2b_s39b_b160k
              freeze: True
              layer: penultimate
              always_return_pooled: True
              legacy: False
          - is_trainable: False
            input_key: original_size_as_tuple
            target: sgm.modules.encoders.modules.ConcatTimestepEmbedderND
            params:
              outdim: 256
          - is_trainable: False
            input_key: crop_coords_top_left
            target: sgm.modules.encoders.modules.ConcatTimestepEmbedderND
            params:
              outdim: 256
          - is_trainable: False
            input_key: target_size_as_tuple
            target: sgm.modules.encoders.modules.ConcatTimestepEmbedderND
            params:
              outdim: 256

    first_stage_config:
      target: sgm.models.autoencoder.AutoencoderKLInferenceWrapper
      params:
{_vae_params_yaml(vae, "attn_type: vanilla-xformers")}"""


# ---------------------------------------------------------------------------
# writers
# ---------------------------------------------------------------------------

def _save(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # write beside and rename, so a WebUI scanning the folder never sees a half-written file
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata=metadata or {})
    _sort_metadata(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors 0.8 creates files 0600: a WebUI user might not read them
    os.replace(tmp, path)


def _sort_metadata(path: str) -> None:
    """Rewrite the header with its metadata keys sorted, in place.

    safetensors writes a multi-key metadata map in a per-process random order, which would make the
    file (and so the model hash the WebUI reports) differ between otherwise identical runs.
    """
    with open(path, "r+b") as fh:
        size = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(size))
        if len(header.get("__metadata__") or {}) < 2:
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > size:  # same content, same escapes: cannot grow; refuse rather than corrupt
            raise ValueError(f"{path}: re-encoded header is longer than the original")
        fh.seek(8)
        fh.write(text.ljust(size, b" "))  # safetensors pads the header with spaces


UNET_PRESETS = {
    # SD1.5 block layout (same input/middle/output block indices), 1/5 of the width
    "sd15-small": dict(model_channels=64, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                       attention_resolutions=(4, 2, 1)),
    # WebUI Forge / ComfyUI-style detectors only accept SD1.5 with model_channels 320,
    # so keep that width but use 3 levels with 1 res block each (cross-attention at
    # latent, latent/2, latent/4 and in the middle block at latent/4)
    "forge-small": dict(model_channels=320, channel_mult=(1, 1, 1), num_res_blocks=1,
                        attention_resolutions=(4, 2, 1), transformer_depth=(1, 1, 1)),
    # SD1.5 block layout (so input_blocks.7/8, middle_block, output_blocks.3-5 carry attention at
    # latent/4 and latent/8 like the real model) at 320 channels on every level: Forge takes a UNet
    # for SD1.5 only with model_channels 320
    "forge-sd15-small": dict(model_channels=320, channel_mult=(1, 1, 1, 1), num_res_blocks=2,
                             attention_resolutions=(4, 2, 1)),
}


SDXL_UNET_PRESETS = {
    "sdxl-small": dict(model_channels=64, num_head_channels=16, transformer_depth=(0, 1, 1),
                       transformer_depth_middle=1),
    # SDXL base: 10 transformer blocks per attention block at latent/4 (and in the middle), 2 at latent/2
    "sdxl-base": dict(model_channels=320, num_head_channels=64, transformer_depth=(0, 2, 10),
                      transformer_depth_middle=10),
    # Forge files input transformer depths [0,0,1,1,2,2] (Segmind-Vega-like) under its SDXL guess and
    # needs model_channels 320; 320 wide everywhere keeps a step cheap on CPU
    "forge-sdxl-small": dict(model_channels=320, channel_mult=(1, 1, 1), num_head_channels=64,
                             transformer_depth=(0, 1, 2), transformer_depth_middle=1),
    # Forge Classic and Neo know no Segmind-Vega-like SDXL: their guess wants SDXL base's depths
    # [0,0,2,2,10,10] at 320 channels (checked on Classic 1f95d717; Neo 7862a96 has the same rule)
    "classic-sdxl-small": dict(model_channels=320, channel_mult=(1, 1, 1), num_head_channels=64,
                               transformer_depth=(0, 2, 10), transformer_depth_middle=10),
}

SDXL_UNET_BASE = dict(channel_mult=(1, 2, 4), attention_resolutions=(4, 2), context_dim=2048,
                      use_linear_in_transformer=True, adm_in_channels=2816)


def sdxl_unet_config(unet_preset: str = "sdxl-small", model_channels: int | None = None) -> UNetConfig:
    kw = {**SDXL_UNET_BASE, **SDXL_UNET_PRESETS[unet_preset]}
    if model_channels:
        kw["model_channels"] = model_channels
    return UNetConfig(**kw)


def sd15_configs(full_te_vae: bool = False, model_channels: int | None = None,
                 te_layers: int | None = None,
                 unet_preset: str = "sd15-small") -> tuple[UNetConfig, VAEConfig, CLIPTextConfig]:
    kw = dict(UNET_PRESETS[unet_preset])
    if model_channels:
        kw["model_channels"] = model_channels
    unet = UNetConfig(**kw)
    vae = VAEConfig(ch=128 if full_te_vae else 32)
    te = CLIPTextConfig(num_hidden_layers=te_layers or (12 if full_te_vae else 2))
    return unet, vae, te


def sd15_state_dict(unet: UNetConfig, vae: VAEConfig, te: CLIPTextConfig, seed: int = 0,
                    dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    sd.update(random_tensors(unet_spec(unet), seed=seed, dtype=dtype))
    sd.update(random_tensors(vae_spec(vae), seed=seed + 1, dtype=dtype))
    sd.update(random_tensors(clip_text_spec(te), seed=seed + 2, dtype=dtype))
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = \
        torch.arange(te.max_position_embeddings, dtype=torch.int64).unsqueeze(0)
    sd.update(ddpm_schedule_buffers())
    return sd


def write_sd15(out_dir: str, name: str = SD15_NAME, full_te_vae: bool = False, seed: int = 0,
               model_channels: int | None = None, te_layers: int | None = None,
               bpe_path: str | None = None, clip_dir: str | None = None,
               unet_preset: str = "sd15-small", dtype: torch.dtype = torch.float16) -> str:
    """Write DIR/NAME.safetensors + DIR/NAME.yaml (+ tokenizer folder). Returns the checkpoint path."""
    unet, vae, te = sd15_configs(full_te_vae, model_channels, te_layers, unet_preset)
    clip_dir = clip_dir or os.path.join(out_dir, TOKENIZER_DIR)
    write_clip_tokenizer(clip_dir, bpe_path, te)
    ckpt = os.path.join(out_dir, name + ".safetensors")
    _save(sd15_state_dict(unet, vae, te, seed=seed, dtype=dtype), ckpt,
          {"scfg_test_model": "sd15", "full_te_vae": str(bool(full_te_vae))})
    with open(os.path.join(out_dir, name + ".yaml"), "w") as fh:
        fh.write(sd15_yaml(unet, vae, clip_dir))
    return ckpt


def openclip_text_spec(width: int, layers: int, heads_unused: int = 0, vocab: int = CLIP_VOCAB_SIZE,
                       ctx: int = MAX_LENGTH, proj_dim: int | None = None,
                       prefix: str = "conditioner.embedders.1.model.") -> Spec:
    """Keys/shapes of open_clip's text tower as stored in SDXL checkpoints."""
    s: Spec = {}
    s[prefix + "token_embedding.weight"] = (vocab, width)
    s[prefix + "positional_embedding"] = (ctx, width)
    s[prefix + "text_projection"] = (width, proj_dim or width)
    s[prefix + "logit_scale"] = ()
    for i in range(layers):
        p = f"{prefix}transformer.resblocks.{i}."
        s[p + "attn.in_proj_weight"] = (3 * width, width)
        s[p + "attn.in_proj_bias"] = (3 * width,)
        _lin(s, p + "attn.out_proj", width, width)
        _gn(s, p + "ln_1", width)
        _gn(s, p + "ln_2", width)
        _lin(s, p + "mlp.c_fc", width, 4 * width)
        _lin(s, p + "mlp.c_proj", 4 * width, width)
    _gn(s, prefix + "ln_final", width)
    return s


OPENCLIP_G_WIDTH = 1280  # ViT-bigG/14 text tower; SDXL's context 2048 = 768 (CLIP-L) + 1280
SDXL_CLIP_L_PREFIX = "conditioner.embedders.0.transformer.text_model."


@dataclass
class SDXLTextConfig:
    clip_l: CLIPTextConfig
    openclip_layers: int


def sdxl_configs(full_te_vae: bool = False, model_channels: int | None = None,
                 unet_preset: str = "sdxl-small") -> tuple[UNetConfig, VAEConfig, SDXLTextConfig]:
    """``full_te_vae``: the released sizes (CLIP-L 12 layers, bigG 32, VAE ch 128), which Forge needs."""
    unet = sdxl_unet_config(unet_preset, model_channels)
    vae = VAEConfig(ch=128 if full_te_vae else 32)
    te = SDXLTextConfig(CLIPTextConfig(num_hidden_layers=12 if full_te_vae else 2),
                        openclip_layers=32 if full_te_vae else 2)
    return unet, vae, te


def sdxl_text_specs(te: SDXLTextConfig) -> tuple[Spec, Spec]:
    """Key/shape specs of SDXL's two text encoders: (CLIP-L, OpenCLIP bigG)."""
    return (clip_text_spec(te.clip_l, prefix=SDXL_CLIP_L_PREFIX),
            openclip_text_spec(OPENCLIP_G_WIDTH, te.openclip_layers, proj_dim=OPENCLIP_G_WIDTH))


def sdxl_state_dict(unet: UNetConfig, vae: VAEConfig, te: SDXLTextConfig, seed: int = 0,
                    dtype: torch.dtype = torch.float16, prediction: str = "eps",
                    ztsnr: bool = False) -> dict[str, torch.Tensor]:
    spec_l, spec_g = sdxl_text_specs(te)
    sd: dict[str, torch.Tensor] = prediction_markers(prediction, ztsnr)
    sd.update(random_tensors(unet_spec(unet), seed=seed, dtype=dtype))
    sd.update(random_tensors(vae_spec(vae), seed=seed + 1, dtype=dtype))
    sd.update(random_tensors(spec_l, seed=seed + 2, dtype=dtype))
    sd[SDXL_CLIP_L_PREFIX + "embeddings.position_ids"] = \
        torch.arange(te.clip_l.max_position_embeddings, dtype=torch.int64).unsqueeze(0)
    g = random_tensors(spec_g, seed=seed + 3, dtype=dtype)
    g["conditioner.embedders.1.model.logit_scale"] = torch.tensor(math.log(1 / 0.07), dtype=dtype)
    sd.update(g)
    return sd


def write_sdxl(out_dir: str, name: str | None = None, seed: int = 0, model_channels: int | None = None,
               bpe_path: str | None = None, clip_dir: str | None = None,
               unet_preset: str = "sdxl-small", full_te_vae: bool = False,
               dtype: torch.dtype = torch.float16, prediction: str = "eps", ztsnr: bool = False) -> str:
    """SDXL-topology checkpoint (sgm key layout).

    UNet: SDXL layout (attention at ds 2 and 4, linear proj), context 2048 = 768 (CLIP-L) + 1280
    (OpenCLIP bigG width), adm 2816; ``sdxl-small``: model_channels 64, head width 16, one transformer
    per level; ``forge-sdxl-small``: 320 channels on every level, depths 1 and 2 (1 in the middle);
    ``sdxl-base``: the SDXL base UNet itself (2.6 G parameters, 5 GB in fp16).
    Text encoders: CLIP-L and an OpenCLIP ViT-bigG text tower (width 1280), 2 layers each, or 12 and 32
    (the released sizes) with ``full_te_vae``, which also writes the full SD VAE (ch 128).
    NOTE: the yaml's FrozenOpenCLIPEmbedder2 builds ViT-bigG-14 with 32 layers; without ``full_te_vae``
    the WebUI loads with strict=False, so missing layers keep their init values.
    ``prediction="v"``: VScaling in the yaml and a ``v_pred`` key; ``ztsnr``: a ``ztsnr`` key too.
    """
    unet, vae, te = sdxl_configs(full_te_vae, model_channels, unet_preset)
    name = name or checkpoint_name(SDXL_NAME, prediction, ztsnr)
    clip_dir = clip_dir or os.path.join(out_dir, TOKENIZER_DIR)
    write_clip_tokenizer(clip_dir, bpe_path, te.clip_l)
    ckpt = os.path.join(out_dir, name + ".safetensors")
    meta = {"scfg_test_model": "sdxl"}
    if prediction != "eps" or ztsnr:  # the eps file stays byte for byte what it was
        meta.update(scfg_prediction=prediction, scfg_ztsnr=str(bool(ztsnr)))
    _save(sdxl_state_dict(unet, vae, te, seed=seed, dtype=dtype, prediction=prediction, ztsnr=ztsnr), ckpt,
          meta)
    with open(os.path.join(out_dir, name + ".yaml"), "w") as fh:
        fh.write(sdxl_yaml(unet, vae, clip_dir, te.clip_l.num_hidden_layers, prediction))
    return ckpt


# ---------------------------------------------------------------------------
# SD2.x and the prediction type markers
# ---------------------------------------------------------------------------

OPENCLIP_H_WIDTH, OPENCLIP_H_LAYERS = 1024, 24  # ViT-H/14 text tower (heads 16, mlp 4096)
SD2_TE_PREFIX = "cond_stage_model.model."
# huggingface_guess SD20.model_type / ComfyUI: std(bias) > 0.09 -> v-prediction
V_MARKER_KEY = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
V_MARKER_STD = 0.2
V_PRED_KEY, ZTSNR_KEY = "v_pred", "ztsnr"  # Forge/Neo/reForge/Classic: presence means v / zero terminal SNR
PREDICTIONS = ("eps", "v")

SD2_UNET_BASE = dict(channel_mult=(1, 2, 4, 4), num_res_blocks=2, attention_resolutions=(4, 2, 1),
                     num_head_channels=64, context_dim=1024, use_linear_in_transformer=True)
SD2_UNET_PRESETS = {
    # SD2 block layout (attention at latent/1, /2, /4 and in the middle), 1/5 of the width: A1111
    # builds the UNet from the yaml
    "sd2-small": dict(model_channels=64),
    # Forge takes a UNet for SD2 by model_channels 320, context 1024 and linear projections
    "forge-sd2-small": dict(model_channels=320, channel_mult=(1, 1, 1, 1)),
    # the released SD 2.x UNet (865 M parameters)
    "sd2-base": dict(model_channels=320),
}


def sd2_unet_config(unet_preset: str = "sd2-small", model_channels: int | None = None) -> UNetConfig:
    kw = {**SD2_UNET_BASE, **SD2_UNET_PRESETS[unet_preset]}
    if model_channels:
        kw["model_channels"] = model_channels
    return UNetConfig(**kw)


def sd2_text_spec() -> Spec:
    """OpenCLIP ViT-H-14's text tower (what ``open_clip.create_model("ViT-H-14")`` holds less ``visual``)."""
    return openclip_text_spec(OPENCLIP_H_WIDTH, OPENCLIP_H_LAYERS, proj_dim=OPENCLIP_H_WIDTH,
                              prefix=SD2_TE_PREFIX)


def sd2_configs(full_te_vae: bool = False, model_channels: int | None = None,
                unet_preset: str = "sd2-small") -> tuple[UNetConfig, VAEConfig]:
    """``full_te_vae``: the SD VAE (ch 128) that Forge builds from a fixed config; the text tower is
    always full size."""
    return sd2_unet_config(unet_preset, model_channels), VAEConfig(ch=128 if full_te_vae else 32)


def prediction_markers(prediction: str = "eps", ztsnr: bool = False) -> dict[str, torch.Tensor]:
    """The empty ``v_pred`` / ``ztsnr`` tensors that ComfyUI-style loaders look for."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, not {prediction!r}")
    if ztsnr and prediction != "v":
        raise ValueError("zero terminal SNR needs v-prediction")
    out = {}
    if prediction == "v":
        out[V_PRED_KEY] = torch.tensor([])
    if ztsnr:
        out[ZTSNR_KEY] = torch.tensor([])
    return out


def sd2_state_dict(unet: UNetConfig, vae: VAEConfig, prediction: str = "eps", ztsnr: bool = False,
                   seed: int = 0, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    sd = prediction_markers(prediction, ztsnr)
    sd.update(random_tensors(unet_spec(unet), seed=seed, dtype=dtype))
    sd.update(random_tensors(vae_spec(vae), seed=seed + 1, dtype=dtype))
    sd.update(random_tensors(sd2_text_spec(), seed=seed + 2, dtype=dtype))
    sd[SD2_TE_PREFIX + "logit_scale"] = torch.tensor(math.log(1 / 0.07), dtype=dtype)
    if prediction == "v":  # zeros (std 0) from random_tensors mark eps
        g = torch.Generator().manual_seed(seed + 3)
        sd[V_MARKER_KEY] = (torch.randn(sd[V_MARKER_KEY].shape, generator=g) * V_MARKER_STD).to(dtype)
    sd.update(ddpm_schedule_buffers())
    return sd


def checkpoint_name(base: str, prediction: str = "eps", ztsnr: bool = False) -> str:
    """Default file name: ``base``, ``base-v``, ``base-v-ztsnr``."""
    return base + ("-v" if prediction == "v" else "") + ("-ztsnr" if ztsnr else "")


def write_sd2(out_dir: str, name: str | None = None, prediction: str = "eps", ztsnr: bool = False,
              full_te_vae: bool = False, seed: int = 0, model_channels: int | None = None,
              unet_preset: str = "sd2-small", dtype: torch.dtype = torch.float16) -> str:
    """SD2.x-topology checkpoint (ldm key layout) + its yaml; ``prediction`` "eps" (512-base) or "v" (768-v).

    ~0.7 GB in float16 for the text tower alone; ``--unet forge-sd2-small --full-te-vae`` ~1.1 GB.
    """
    unet, vae = sd2_configs(full_te_vae, model_channels, unet_preset)
    name = name or checkpoint_name(SD2_NAME, prediction, ztsnr)
    ckpt = os.path.join(out_dir, name + ".safetensors")
    _save(sd2_state_dict(unet, vae, prediction, ztsnr, seed=seed, dtype=dtype), ckpt,
          {"scfg_test_model": "sd2", "scfg_prediction": prediction, "scfg_ztsnr": str(bool(ztsnr))})
    with open(os.path.join(out_dir, name + ".yaml"), "w") as fh:
        fh.write(sd2_yaml(unet, vae, prediction))
    return ckpt


def unet_config(unet_preset: str = "sd15-small", model_channels: int | None = None) -> UNetConfig:
    kw = dict(UNET_PRESETS[unet_preset])
    if model_channels:
        kw["model_channels"] = model_channels
    return UNetConfig(**kw)


def write_lora(out_dir: str, name: str = LORA_NAME, rank: int = 4, seed: int = 0,
               model_channels: int | None = None, unet_preset: str = "sd15-small", std: float = 0.02) -> str:
    """kohya-style LoRA for a test UNet: cross-attention q/k/v/out of every UNet transformer."""
    spec = unet_spec(unet_config(unet_preset, model_channels), prefix="")
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key, shape in sorted(spec.items()):
        if ".attn2.to_" not in key or not key.endswith(".weight") or len(shape) != 2:
            continue
        base = "lora_unet_" + key[: -len(".weight")].replace(".", "_")
        cout, cin = shape
        out[base + ".lora_down.weight"] = (torch.randn((rank, cin), generator=g) * std).half()
        out[base + ".lora_up.weight"] = (torch.randn((cout, rank), generator=g) * std).half()
        out[base + ".alpha"] = torch.tensor(float(rank)).half()
    path = os.path.join(out_dir, name + ".safetensors")
    _save(out, path, {"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                      "ss_base_model_version": "sd_v1", "scfg_test_model": "lora"})
    return path


def input_block_channels(cfg: UNetConfig) -> list[int]:
    """Output channels of every ``input_blocks.i`` (one ControlNet zero conv each)."""
    chans, ch = [cfg.model_channels], cfg.model_channels
    for level, mult in enumerate(cfg.channel_mult):
        ch = mult * cfg.model_channels
        chans += [ch] * cfg.num_res_blocks
        if level != len(cfg.channel_mult) - 1:
            chans.append(ch)
    return chans


HINT_CHANNELS = (16, 16, 32, 32, 96, 96, 256)  # ldm cldm.ControlNet.input_hint_block convs 0, 2, .., 12


def controlnet_spec(cfg: UNetConfig, hint_channels: int = 3, prefix: str = "") -> Spec:
    """Keys/shapes of ldm ``cldm.ControlNet`` (the released control_v11*_sd15 layout) for ``cfg``.

    The trainable copy of the UNet encoder (time_embed, input_blocks, middle_block), one 1x1 zero
    conv per input block and one after the middle block, and the hint encoder (image -> latent/8).
    """
    unet = unet_spec(cfg, prefix="")
    keep = ("time_embed.", "label_emb.", "input_blocks.", "middle_block.")
    s: Spec = {prefix + k: v for k, v in unet.items() if k.startswith(keep)}
    cin = hint_channels
    for i, cout in enumerate(HINT_CHANNELS):
        _conv(s, f"{prefix}input_hint_block.{2 * i}", cin, cout)
        cin = cout
    _conv(s, f"{prefix}input_hint_block.{2 * len(HINT_CHANNELS)}", cin, cfg.model_channels)
    chans = input_block_channels(cfg)
    for i, ch in enumerate(chans):
        _conv(s, f"{prefix}zero_convs.{i}.0", ch, ch, k=1)
    _conv(s, prefix + "middle_block_out.0", chans[-1], chans[-1], k=1)
    return s


def write_controlnet(out_dir: str, name: str = CONTROLNET_NAME, seed: int = 0,
                     model_channels: int | None = None, unet_preset: str = "sd15-small",
                     hint_channels: int = 3) -> str:
    """Random-weight ControlNet whose residuals fit the UNet of the same preset/model_channels.

    Weights N(0, 0.02) like the checkpoints, except the hint encoder (He init, so the control image
    reaches the residuals) and the zero convs (not zero, N(0, 0.02), so the control acts at once).
    """
    spec = controlnet_spec(unet_config(unet_preset, model_channels), hint_channels)
    sd = random_tensors(spec, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    for key, shape in sorted(spec.items()):
        if key.startswith("input_hint_block.") and key.endswith(".weight"):
            fan_in = shape[1] * shape[2] * shape[3]
            sd[key] = (torch.randn(shape, generator=g) * math.sqrt(2.0 / fan_in)).half()
    path = os.path.join(out_dir, name + ".safetensors")
    _save(sd, path, {"scfg_test_model": "controlnet"})
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.e2e.models", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output folder (e.g. the WebUI's --ckpt-dir)")
    ap.add_argument("--kind", default="sd15", choices=["sd15", "sd2", "sdxl", "lora", "controlnet", "all"])
    ap.add_argument("--prediction", default="eps", choices=PREDICTIONS,
                    help="sd2/sdxl: eps or v-prediction (yaml, SD2 norm1.bias std marker, v_pred key)")
    ap.add_argument("--ztsnr", action="store_true",
                    help="sd2/sdxl with --prediction v: add the ztsnr key (zero terminal SNR)")
    ap.add_argument("--name", default=None, help="checkpoint base name (default per kind)")
    ap.add_argument("--full-te-vae", action="store_true",
                    help="sd15: full-size CLIP-L (12 layers) + SD VAE (ch 128), e.g. for WebUI Forge; "
                         "sd2: SD VAE (ch 128; the ViT-H text tower is always full size)")
    ap.add_argument("--sdxl-full-te-vae", action="store_true",
                    help="sdxl: full-size CLIP-L (12 layers) + OpenCLIP bigG (32 layers) + SD VAE (ch 128), "
                         "as WebUI Forge needs (~1.8 GB in float16 before the UNet)")
    ap.add_argument("--unet", default=None,
                    choices=sorted(UNET_PRESETS) + sorted(SD2_UNET_PRESETS) + sorted(SDXL_UNET_PRESETS),
                    help="UNet preset; sd15/lora/controlnet (default sd15-small; forge-small: "
                         "model_channels 320, 3 levels; forge-sd15-small: SD1.5 block layout, 320 channels "
                         "on every level); sdxl (default sdxl-small; forge-sdxl-small: 320 channels on "
                         "every level, depths 1/2, for Forge; classic-sdxl-small: SDXL base depths at 320 "
                         "channels, for Forge Classic and Neo; sdxl-base: the real SDXL base UNet, 5 GB); "
                         "sd2 (default sd2-small; forge-sd2-small: 320 channels on every level, for Forge; "
                         "sd2-base: the real SD2.x UNet)")
    ap.add_argument("--forge", action="store_true",
                    help="sd15: shorthand for --full-te-vae --unet forge-small (loads in WebUI Forge too)")
    ap.add_argument("--model-channels", type=int, default=None,
                    help="UNet model_channels override (multiple of 32; default per preset)")
    ap.add_argument("--te-layers", type=int, default=None, help="sd15: text encoder layers")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float16", choices=["float16", "float32"],
                    help="sd15/sd2/sdxl: dtype of the checkpoint weights")
    ap.add_argument("--lora-std", type=float, default=0.02, help="lora: std of the down/up weights")
    ap.add_argument("--bpe", default=None, help="path of bpe_simple_vocab_16e6.txt.gz")
    ap.add_argument("--clip-dir", default=None, help="tokenizer/config folder (default OUT/clip-tokenizer)")
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    if a.forge:
        a.full_te_vae, a.unet = True, "forge-small"
    kinds = ["sd15", "sdxl", "lora"] if a.kind == "all" else [a.kind]
    if a.full_te_vae and kinds == ["sdxl"]:  # it was silently ignored there; say what does it
        ap.error("--full-te-vae is for sd15: with --kind sdxl use --sdxl-full-te-vae")
    if a.unet in SDXL_UNET_PRESETS and kinds != ["sdxl"]:
        ap.error(f"--unet {a.unet} is an SDXL preset: use it with --kind sdxl")
    if a.unet in SD2_UNET_PRESETS and kinds != ["sd2"]:
        ap.error(f"--unet {a.unet} is an SD2 preset: use it with --kind sd2")
    if a.unet in UNET_PRESETS and kinds in (["sdxl"], ["sd2"]):
        presets = SDXL_UNET_PRESETS if kinds == ["sdxl"] else SD2_UNET_PRESETS
        ap.error(f"--unet {a.unet} is an SD1.5 preset: with --kind {kinds[0]} use one of {sorted(presets)}")
    if (a.prediction != "eps" or a.ztsnr) and kinds not in (["sd2"], ["sdxl"]):
        ap.error("--prediction / --ztsnr are for --kind sd2 or sdxl")
    if a.ztsnr and a.prediction != "v":
        ap.error("--ztsnr needs --prediction v")
    sdxl_unet = a.unet or "sdxl-small"
    sd2_unet = a.unet or "sd2-small"
    a.unet = a.unet or "sd15-small"
    dtype = getattr(torch, a.dtype)
    for k in kinds:
        if k == "sd15":
            p = write_sd15(a.out, a.name or SD15_NAME, a.full_te_vae, a.seed, a.model_channels, a.te_layers,
                           a.bpe, a.clip_dir, a.unet, dtype)
        elif k == "sd2":
            p = write_sd2(a.out, a.name, a.prediction, a.ztsnr, a.full_te_vae, a.seed, a.model_channels,
                          sd2_unet, dtype)
        elif k == "sdxl":
            p = write_sdxl(a.out, a.name, a.seed, a.model_channels, a.bpe, a.clip_dir, sdxl_unet,
                           a.sdxl_full_te_vae, dtype, a.prediction, a.ztsnr)
        elif k == "controlnet":
            p = write_controlnet(a.out, a.name or CONTROLNET_NAME, a.seed, a.model_channels, a.unet)
        else:
            p = write_lora(a.out, a.name or LORA_NAME, seed=a.seed, model_channels=a.model_channels,
                           unet_preset=a.unet, std=a.lora_std)
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())

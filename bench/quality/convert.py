"""Convert bench.quality.train's diffusers/transformers export to ONE original-ldm-layout checkpoint.

    python -m bench.quality.convert --work /work/scratch/quality --out DIR [--ldm-src SRC] [--fixture F]
    python -m bench.quality.convert --from-fixture FIXTURE --out DIR   # no training: the committed weights

Writes DIR/scfg-shapes-sd15.safetensors (fp16; keys model.diffusion_model.*, first_stage_model.*,
cond_stage_model.transformer.text_model.*, plus the DDPM schedule buffers), DIR/scfg-shapes-sd15.yaml
and DIR/clip-tokenizer/ (tokenizer + text config the yaml's FrozenCLIPEmbedder reads), using the
key mapping below (not diffusers' conversion scripts) and tests/e2e/models.py's yaml/tokenizer writers.

The committed fixture (FIXTURE, --fixture writes it) holds what training learnt: the UNet and the
text encoder in these ldm keys (fp16) and the VAE's quant_conv / post_quant_conv (fp32; the latent
scale calibrated on the data). The rest of the VAE is a function of nothing (analytic_vae), so
--from-fixture rebuilds it and writes the same checkpoint a fresh conversion writes.

Checks: the key set and every shape equal tests.e2e.models' ldm specs for the same config; with
--ldm-src (a folder holding the ``ldm`` package of github:Stability-AI/stablediffusion) the ldm UNet
and VAE are built from the yaml, loaded strictly, and their outputs compared with diffusers'.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

import torch

from bench.quality.train import TE, UNET, VAE
from tests.e2e import models as e2e

NAME = "scfg-shapes-sd15"
RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
          "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
TE_PREFIX = "cond_stage_model.transformer.text_model."
VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _resnet(rest: str) -> str:
    head, tail = rest.split(".", 1)
    return RESNET[head] + "." + tail


def unet_key(k: str, n: int, attn_levels: list[bool]) -> str:
    """diffusers UNet2DConditionModel key -> ldm openaimodel.UNetModel key (n res blocks per level)."""
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    base, param = k.rsplit(".", 1)
    if base in fixed:
        return f"{fixed[base]}.{param}"
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", k):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        idx = 1 + i * (n + 1) + j
        return f"input_blocks.{idx}.0.{_resnet(rest)}" if kind == "resnets" else \
            f"input_blocks.{idx}.1.{rest}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", k):
        return f"input_blocks.{1 + int(m[1]) * (n + 1) + n}.0.op.{m[2]}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", k):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        idx = i * (n + 1) + j
        return f"output_blocks.{idx}.0.{_resnet(rest)}" if kind == "resnets" else \
            f"output_blocks.{idx}.1.{rest}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", k):
        i = int(m[1])
        has_attn = attn_levels[len(attn_levels) - 1 - i]
        return f"output_blocks.{i * (n + 1) + n}.{2 if has_attn else 1}.conv.{m[2]}"
    if m := re.match(r"mid_block\.resnets\.(\d)\.(.+)", k):
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
    if m := re.match(r"mid_block\.attentions\.0\.(.+)", k):
        return f"middle_block.1.{m[1]}"
    raise KeyError(k)


def vae_key(k: str, levels: int) -> str:
    """diffusers AutoencoderKL key -> ldm AutoencoderKL key."""
    k = k.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    k = re.sub(r"mid_block\.resnets\.(\d)", lambda m: f"mid.block_{int(m[1]) + 1}", k)
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)$", k):
        return f"{m[1]}.mid.attn_1.{VAE_ATTN[m[2]]}.{m[3]}"
    k = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets", r"encoder.down.\1.block", k)
    k = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0", r"encoder.down.\1.downsample", k)
    k = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets",
               lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block", k)
    k = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0",
               lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample", k)
    return k


def convert(unet, vae, te) -> dict[str, torch.Tensor]:
    """fp32 ldm-layout state dict of the three modules (plus position_ids and DDPM buffers)."""
    n = UNET.num_res_blocks
    attn = [2 ** i in UNET.attention_resolutions for i in range(len(UNET.channel_mult))]
    sd = {"model.diffusion_model." + unet_key(k, n, attn): v for k, v in unet.state_dict().items()}
    for k, v in vae.state_dict().items():
        nk = vae_key(k, len(VAE.ch_mult))
        if ".mid.attn_1." in nk and v.ndim == 2:
            v = v[:, :, None, None]  # linear -> 1x1 conv
        sd["first_stage_model." + nk] = v
    for k, v in te.state_dict().items():  # transformers 5 dropped CLIPTextModel's "text_model." level
        sd[TE_PREFIX + k.removeprefix("text_model.")] = v
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = \
        torch.arange(TE.max_position_embeddings, dtype=torch.int64).unsqueeze(0)
    sd.update(e2e.ddpm_schedule_buffers())
    return {k: v.detach().float().contiguous() if v.is_floating_point() else v for k, v in sd.items()}


FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixture", NAME + ".fixture.safetensors")
LEARNT = ("model.diffusion_model.", "cond_stage_model.", "first_stage_model.quant_conv.",
          "first_stage_model.post_quant_conv.")


def fixture_part(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The learnt tensors of a converted state dict (fp16, but the VAE's scale convolutions)."""
    part = {k: v for k, v in sd.items() if k.startswith(LEARNT)}
    return {k: v.half() if v.is_floating_point() and not k.startswith("first_stage_model.") else v
            for k, v in part.items()}


def from_fixture(path: str) -> dict[str, torch.Tensor]:
    """The full fp32 ldm state dict from the fixture: the set VAE rebuilt, its scale convs loaded."""
    import tempfile

    from safetensors.torch import load_file

    from bench.quality import analytic_vae
    from bench.quality.train import build

    part = load_file(path)
    with tempfile.TemporaryDirectory() as tok:
        vae = build(tok)[0]
    analytic_vae.set_weights(vae)
    scale = {k.removeprefix("first_stage_model."): v for k, v in part.items()
             if k.startswith("first_stage_model.")}
    unexpected = vae.load_state_dict(scale, strict=False).unexpected_keys
    assert not unexpected and len(scale) == 4, (unexpected, sorted(scale))
    sd = {k: v.float() if v.is_floating_point() else v for k, v in part.items()}
    for k, v in vae.state_dict().items():
        nk = "first_stage_model." + vae_key(k, len(VAE.ch_mult))
        if nk not in sd:
            sd[nk] = v[:, :, None, None] if ".mid.attn_1." in nk and v.ndim == 2 else v
    sd.update(e2e.ddpm_schedule_buffers())
    return {k: v.detach().float().contiguous() if v.is_floating_point() else v for k, v in sd.items()}


def check_specs(sd: dict[str, torch.Tensor]) -> None:
    spec = {**e2e.unet_spec(UNET), **e2e.vae_spec(VAE), **e2e.clip_text_spec(TE)}
    got = {k: tuple(v.shape) for k, v in sd.items() if k.startswith(("model.", "first_stage", "cond_stage"))}
    got.pop("cond_stage_model.transformer.text_model.embeddings.position_ids")
    missing, extra = sorted(set(spec) - set(got)), sorted(set(got) - set(spec))
    bad = [(k, got[k], spec[k]) for k in spec if k in got and got[k] != tuple(spec[k])]
    assert not (missing or extra or bad), (missing[:5], extra[:5], bad[:5])
    print(f"spec check: {len(spec)} keys, all names and shapes equal tests.e2e.models' ldm specs")


@torch.no_grad()
def check_ldm(sd, yaml_path: str, ldm_src: str, unet, vae) -> None:
    """Build ldm's UNetModel / Encoder / Decoder from the yaml, load strictly, compare with diffusers."""
    from omegaconf import OmegaConf

    sys.path.insert(0, os.path.abspath(ldm_src))
    from ldm.modules.diffusionmodules.model import Decoder, Encoder
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    cfg = OmegaConf.load(yaml_path).model.params
    lu = UNetModel(**OmegaConf.to_container(cfg.unet_config.params)).eval()
    strip = lambda p: {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}  # noqa: E731
    lu.load_state_dict(strip("model.diffusion_model."), strict=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 32, 32, generator=g)
    t = torch.tensor([10, 700])
    ctx = torch.randn(2, 77, TE.hidden_size, generator=g)
    a, b = lu(x, t, context=ctx), unet(x, t, encoder_hidden_states=ctx).sample
    print(f"ldm UNet vs diffusers: max |diff| {(a - b).abs().max():.2e} (output std {b.std():.3f})")
    dd = OmegaConf.to_container(cfg.first_stage_config.params.ddconfig)
    enc, dec = Encoder(**dd).eval(), Decoder(**dd).eval()
    fs = strip("first_stage_model.")
    enc.load_state_dict({k[8:]: v for k, v in fs.items() if k.startswith("encoder.")}, strict=True)
    dec.load_state_dict({k[8:]: v for k, v in fs.items() if k.startswith("decoder.")}, strict=True)
    img = torch.rand(1, 3, 256, 256, generator=g) * 2 - 1
    mom = torch.nn.functional.conv2d(enc(img), fs["quant_conv.weight"], fs["quant_conv.bias"])
    mean = vae.encode(img).latent_dist.mean
    z = torch.randn(1, 4, 32, 32, generator=g)
    rec = dec(torch.nn.functional.conv2d(z, fs["post_quant_conv.weight"], fs["post_quant_conv.bias"]))
    print(f"ldm VAE vs diffusers: encoder mean max |diff| {(mom[:, :4] - mean).abs().max():.2e}, "
          f"decoder max |diff| {(rec - vae.decode(z).sample).abs().max():.2e}")


@torch.no_grad()
def check_text(sd, clip_dir: str, te) -> None:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    m = CLIPTextModel(CLIPTextConfig.from_pretrained(clip_dir)).eval()
    inner = "text_model." if any(k.startswith("text_model.") for k in m.state_dict()) else ""
    m.load_state_dict({inner + k[len(TE_PREFIX):]: v for k, v in sd.items()
                       if k.startswith(TE_PREFIX) and not k.endswith("position_ids")}, strict=True)
    tok = CLIPTokenizer.from_pretrained(clip_dir)
    ids = tok(["a red circle on a white background"], padding="max_length", max_length=77,
              return_tensors="pt").input_ids
    d = (m(ids).last_hidden_state - te(ids).last_hidden_state).abs().max()
    print(f"text encoder from {clip_dir} vs trained: max |diff| {d:.2e}")


def main(argv=None):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/work/scratch/quality")
    ap.add_argument("--out", default="/work/scratch/quality/ldm")
    ap.add_argument("--name", default=NAME)
    ap.add_argument("--ldm-src", default=None, help="folder with the ldm package (forward comparison)")
    ap.add_argument("--fixture", default=None, help="also write the learnt tensors here (e.g. FIXTURE)")
    ap.add_argument("--from-fixture", default=None, help="convert the committed fixture, not --work's export")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    if a.from_fixture:
        sd, te = from_fixture(a.from_fixture), None
    else:
        ex = os.path.join(a.work, "export")
        unet = UNet2DConditionModel.from_pretrained(os.path.join(ex, "unet")).eval()
        vae = AutoencoderKL.from_pretrained(os.path.join(ex, "vae")).eval()
        te = CLIPTextModel.from_pretrained(os.path.join(ex, "text_encoder")).eval()
        sd = convert(unet, vae, te)
    check_specs(sd)
    if a.fixture:
        from safetensors.torch import save_file

        os.makedirs(os.path.dirname(os.path.abspath(a.fixture)), exist_ok=True)
        save_file(fixture_part(sd), a.fixture, {"scfg_test_model": "sd15-shapes (learnt tensors)"})
        print(f"{a.fixture} ({os.path.getsize(a.fixture) / 1e6:.2f} MB)")
    os.makedirs(a.out, exist_ok=True)
    clip_dir = os.path.join(a.out, e2e.TOKENIZER_DIR)
    e2e.write_clip_tokenizer(clip_dir, None, TE)
    yaml_path = os.path.join(a.out, a.name + ".yaml")
    with open(yaml_path, "w") as fh:
        fh.write(e2e.sd15_yaml(UNET, VAE, clip_dir).replace("Random-weight SD1.5-topology test model",
                                                            "SD1.x-layout model trained on synthetic shapes"))
    if te is not None:
        check_text(sd, clip_dir, te)
    if a.ldm_src and not a.from_fixture:
        check_ldm(sd, yaml_path, a.ldm_src, unet, vae)
    ckpt = os.path.join(a.out, a.name + ".safetensors")
    buffers = set(e2e.ddpm_schedule_buffers())  # kept in float32, as tests/e2e/models.py writes them
    # and the set VAE too: its output convs cancel carrier terms of a few hundred (analytic_vae),
    # which fp16 weights would leave off by ~0.1; its weights are almost all zeros
    keep = lambda k: k in buffers or k.startswith("first_stage_model.")  # noqa: E731
    half = {k: v.half() if v.is_floating_point() and not keep(k) else v for k, v in sd.items()}
    e2e._save(half, ckpt, {"scfg_test_model": "sd15-shapes"})
    print(f"{ckpt} ({os.path.getsize(ckpt) / 1e6:.2f} MB)\n{yaml_path}\n{clip_dir}")


if __name__ == "__main__":
    main()

"""The random-weight checkpoint generator (tests/e2e/models.py) writes real ldm/sgm key layouts.

Shapes below are those of the released SD1.5 / SDXL checkpoints, so a spec drift that would make
a WebUI silently skip weights (they load with strict=False) fails here without any WebUI.
"""

import gzip
import json
import math

import pytest
import torch

from tests.e2e import models as M


def test_sd15_full_size_spec_matches_released_sd15_layout():
    unet = M.unet_spec(M.UNetConfig(model_channels=320))
    vae = M.vae_spec(M.VAEConfig(ch=128))
    te = M.clip_text_spec(M.CLIPTextConfig(num_hidden_layers=12))
    assert (len(unet), len(vae), len(te)) == (686, 248, 196)
    p = "model.diffusion_model."
    assert unet[p + "input_blocks.1.1.proj_in.weight"] == (320, 320, 1, 1)
    assert unet[p + "input_blocks.7.1.transformer_blocks.0.attn2.to_k.weight"] == (1280, 768)
    assert unet[p + "input_blocks.3.0.op.weight"] == (320, 320, 3, 3)
    assert unet[p + "middle_block.1.transformer_blocks.0.ff.net.0.proj.weight"] == (10240, 1280)
    assert unet[p + "output_blocks.2.1.conv.weight"] == (1280, 1280, 3, 3)
    assert unet[p + "output_blocks.5.2.conv.weight"] == (1280, 1280, 3, 3)
    assert unet[p + "output_blocks.11.1.proj_out.weight"] == (320, 320, 1, 1)
    assert unet[p + "output_blocks.11.0.skip_connection.weight"] == (320, 640, 1, 1)
    assert unet[p + "out.2.weight"] == (4, 320, 3, 3)
    assert p + "output_blocks.2.1.proj_in.weight" not in unet  # no attention at latent/8
    assert vae["first_stage_model.decoder.up.3.block.0.conv1.weight"] == (512, 512, 3, 3)
    assert vae["first_stage_model.encoder.down.1.block.0.nin_shortcut.weight"] == (256, 128, 1, 1)
    assert vae["first_stage_model.quant_conv.weight"] == (8, 8, 1, 1)
    t = "cond_stage_model.transformer.text_model."
    assert te[t + "embeddings.token_embedding.weight"] == (49408, 768)
    assert te[t + "encoder.layers.11.mlp.fc1.weight"] == (3072, 768)


def test_sdxl_full_size_unet_spec_matches_released_sdxl_layout():
    unet = M.unet_spec(M.sdxl_unet_config("sdxl-base"))
    assert sum(math.prod(shape) for shape in unet.values()) == 2_567_463_684  # the released UNet's count
    p = "model.diffusion_model."
    assert unet[p + "label_emb.0.0.weight"] == (1280, 2816)
    assert unet[p + "input_blocks.4.1.proj_in.weight"] == (640, 640)
    assert unet[p + "input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight"] == (1280, 2048)
    assert unet[p + "middle_block.1.transformer_blocks.9.attn1.to_q.weight"] == (1280, 1280)
    assert unet[p + "output_blocks.2.2.conv.weight"] == (1280, 1280, 3, 3)
    assert unet[p + "output_blocks.6.0.skip_connection.weight"] == (320, 960, 1, 1)
    assert unet[p + "output_blocks.8.0.skip_connection.weight"] == (320, 640, 1, 1)
    assert p + "input_blocks.1.1.proj_in.weight" not in unet


def test_small_sd15_keeps_sd15_block_indices_and_is_finite():
    unet, vae, te = M.sd15_configs(te_layers=1)
    sd = M.sd15_state_dict(unet, vae, te)
    full = M.unet_spec(M.UNetConfig(model_channels=320))
    assert set(M.unet_spec(unet)) == set(full)  # same module names as the real SD1.5 UNet
    assert all(torch.isfinite(v.float()).all() for v in sd.values())
    w = sd["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_q.weight"]
    assert w.dtype == torch.float16 and 0.01 < w.float().std() < 0.03
    ac = sd["alphas_cumprod"]
    assert ac.shape == (1000,) and abs(ac[0].item() - (1 - 0.00085)) < 1e-6


def test_forge_preset_is_sd15_by_shape():
    unet, vae, te = M.sd15_configs(full_te_vae=True, unet_preset="forge-small")
    spec = M.unet_spec(unet)
    assert spec["model.diffusion_model.input_blocks.0.0.weight"] == (320, 4, 3, 3)
    assert spec["model.diffusion_model.middle_block.1.proj_in.weight"] == (320, 320, 1, 1)
    assert (vae.ch, te.num_hidden_layers) == (128, 12)


def test_yaml_points_at_tokenizer_folder(tmp_path):
    unet, vae, _ = M.sd15_configs()
    text = M.sd15_yaml(unet, vae, str(tmp_path / "tok"))
    assert f"version: {json.dumps(str(tmp_path / 'tok'))}" in text
    assert "model_channels: 64" in text and "attention_resolutions: [4, 2, 1]" in text


def test_tokenizer_files(tmp_path):
    # a synthetic BPE file with the layout of CLIP's bpe_simple_vocab_16e6.txt.gz
    merges = [f"m{i} x{i}" for i in range(49152 - 256 - 2)]
    bpe = tmp_path / "bpe.txt.gz"
    with gzip.open(bpe, "wt", encoding="utf-8") as fh:
        fh.write("\n".join(["#version: 0.2", *merges, "extra line"]))
    out = M.write_clip_tokenizer(str(tmp_path / "tok"), str(bpe))
    vocab = json.load(open(f"{out}/vocab.json", encoding="utf-8"))
    assert len(vocab) == 49408
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert vocab["a</w>"] == 256 + ord("a") - ord("!")
    lines = open(f"{out}/merges.txt", encoding="utf-8").read().splitlines()
    assert lines[0] == "#version: 0.2" and lines[1:] == merges
    cfg = json.load(open(f"{out}/config.json"))
    assert cfg["model_type"] == "clip_text_model" and cfg["hidden_size"] == 768


def test_real_bpe_vocab_when_installed(tmp_path):
    try:
        path = M.find_bpe_vocab()
    except FileNotFoundError:
        pytest.skip("neither open-clip-torch nor clip is installed")
    vocab = json.load(open(f"{M.write_clip_tokenizer(str(tmp_path), path)}/vocab.json", encoding="utf-8"))
    assert vocab["cat</w>"] == 2368 and vocab["a</w>"] == 320  # CLIP's ids


def test_controlnet_spec_matches_released_sd15_controlnet_layout():
    """control_v11p_sd15_*: 12 zero convs (320 x4, 640 x3, 1280 x5), hint encoder 3 -> 320 at latent/8."""
    spec = M.controlnet_spec(M.UNetConfig(model_channels=320))
    assert [spec[f"zero_convs.{i}.0.weight"][0] for i in range(12)] == [320] * 4 + [640] * 3 + [1280] * 5
    assert "zero_convs.12.0.weight" not in spec
    assert spec["middle_block_out.0.weight"] == (1280, 1280, 1, 1)
    assert spec["input_hint_block.0.weight"] == (16, 3, 3, 3)
    assert spec["input_hint_block.12.weight"] == (256, 96, 3, 3)
    assert spec["input_hint_block.14.weight"] == (320, 256, 3, 3)
    assert spec["input_blocks.5.1.transformer_blocks.0.attn2.to_k.weight"] == (640, 768)
    assert spec["middle_block.1.proj_out.weight"] == (1280, 1280, 1, 1)
    assert not any(k.startswith(("output_blocks.", "out.")) for k in spec)
    unet = M.unet_spec(M.UNetConfig(model_channels=320), prefix="")
    assert all(unet[k] == v for k, v in spec.items() if k.startswith(("input_blocks.", "middle_block.")))


def test_controlnet_and_lora_follow_the_forge_checkpoint_unet(monkeypatch):
    """--unet forge-sd15-small is the UNet that tests/e2e/forge_models.py --unet small writes."""
    from tests.e2e import forge_models as F

    monkeypatch.setattr(F._Builder, "_randn", lambda self, *shape, std=None: torch.zeros(()).expand(*shape))
    builder = F._Builder(torch.Generator(), 0.02, torch.float16)
    F.add_unet(builder, "", **F.unet_layout(None, "small"))
    forge = {k: tuple(v.shape) for k, v in builder.sd.items()}
    cfg = M.unet_config("forge-sd15-small")
    assert M.unet_spec(cfg, prefix="") == forge
    control = M.controlnet_spec(cfg)
    assert all(control[f"zero_convs.{i}.0.weight"] == (320, 320, 1, 1) for i in range(12))
    assert all(forge[k] == v for k, v in control.items() if k.startswith(("input_blocks.", "middle_block.")))


def test_write_controlnet_and_lora(tmp_path):
    from safetensors.torch import load_file

    path = M.write_controlnet(str(tmp_path), unet_preset="sd15-small")
    sd = load_file(path)
    assert {k: tuple(v.shape) for k, v in sd.items()} == M.controlnet_spec(M.unet_config())
    assert sd["zero_convs.0.0.weight"].abs().sum() > 0  # not zero: the control acts at once
    lora = load_file(M.write_lora(str(tmp_path), unet_preset="forge-sd15-small"))
    key = "lora_unet_input_blocks_7_1_transformer_blocks_0_attn2_to_k.lora_down.weight"
    assert lora[key].shape == (4, 768)
    assert lora["lora_unet_input_blocks_7_1_transformer_blocks_0_attn2_to_k.lora_up.weight"].shape == (320, 4)

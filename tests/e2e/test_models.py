"""The random-weight checkpoint generator (tests/e2e/models.py) writes real ldm/sgm key layouts.

Shapes below are those of the released SD1.5 / SDXL checkpoints, so a spec drift that would make
a WebUI silently skip weights (they load with strict=False) fails here without any WebUI.
"""

import gzip
import json
import math
import os

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


def _input_depths(spec, prefix="model.diffusion_model."):
    """Transformer blocks after each input res block, as Forge reads them from the weights."""
    depths = []
    for i in range(1, 12):
        if prefix + f"input_blocks.{i}.0.in_layers.2.weight" not in spec:
            continue  # a downsample block, or past the last level
        depths.append(sum(1 for d in range(20)
                          if prefix + f"input_blocks.{i}.1.transformer_blocks.{d}.attn1.to_q.weight" in spec))
    return depths


def test_forge_sd15_small_unet_has_sd15_block_indices_at_320_channels():
    """Forge takes a UNet for SD1.5 by its shapes: model_channels 320, context 768, conv proj_in, no
    label_emb; a control model / LoRA written with the same preset fits it."""
    cfg = M.unet_config("forge-sd15-small")
    spec = M.unet_spec(cfg)
    full = M.unet_spec(M.UNetConfig(model_channels=320))
    p = "model.diffusion_model."
    # the real SD1.5 names, less the two input skip connections that only a width change needs
    assert set(full) - set(spec) == {p + f"input_blocks.{i}.0.skip_connection.{w}" for i in (4, 7)
                                     for w in ("weight", "bias")}
    assert set(spec) <= set(full)
    assert _input_depths(spec) == [1, 1, 1, 1, 1, 1, 0, 0]
    assert spec[p + "input_blocks.0.0.weight"] == (320, 4, 3, 3)
    assert spec[p + "input_blocks.8.1.proj_in.weight"] == (320, 320, 1, 1)
    assert spec[p + "input_blocks.7.1.transformer_blocks.0.attn2.to_k.weight"] == (320, 768)
    assert spec[p + "middle_block.1.transformer_blocks.0.attn2.to_v.weight"] == (320, 768)
    assert spec[p + "output_blocks.5.1.proj_out.weight"] == (320, 320, 1, 1)
    assert spec[p + "output_blocks.2.1.conv.weight"] == (320, 320, 3, 3)
    assert not any(".label_emb." in k for k in spec)
    control = M.controlnet_spec(cfg)
    assert all(control[f"zero_convs.{i}.0.weight"] == (320, 320, 1, 1) for i in range(12))
    unet = M.unet_spec(cfg, prefix="")
    assert all(unet[k] == v for k, v in control.items() if k.startswith(("input_blocks.", "middle_block.")))


def test_forge_sdxl_small_unet_depths_and_widths():
    """Forge files input transformer depths [0,0,1,1,2,2] under SDXL; context 2048, adm 2816, linear proj."""
    spec = M.unet_spec(M.sdxl_unet_config("forge-sdxl-small"))
    p = "model.diffusion_model."
    assert _input_depths(spec) == [0, 0, 1, 1, 2, 2]
    assert p + "middle_block.1.transformer_blocks.0.attn1.to_q.weight" in spec
    assert p + "middle_block.1.transformer_blocks.1.attn1.to_q.weight" not in spec
    assert spec[p + "input_blocks.0.0.weight"] == (320, 4, 3, 3)
    assert spec[p + "label_emb.0.0.weight"] == (1280, 2816)
    assert spec[p + "input_blocks.8.1.proj_in.weight"] == (320, 320)
    assert spec[p + "input_blocks.7.1.transformer_blocks.1.attn2.to_k.weight"] == (320, 2048)
    assert spec[p + "output_blocks.0.1.transformer_blocks.1.ff.net.0.proj.weight"] == (2560, 320)
    assert p + "output_blocks.6.1.proj_in.weight" not in spec  # no attention at full latent size
    assert spec[p + "output_blocks.5.2.conv.weight"] == (320, 320, 3, 3)
    assert _input_depths(M.unet_spec(M.sdxl_unet_config("sdxl-base"))) == [0, 0, 2, 2, 10, 10]
    classic = M.unet_spec(M.sdxl_unet_config("classic-sdxl-small"))
    assert _input_depths(classic) == [0, 0, 2, 2, 10, 10]
    assert classic[p + "input_blocks.8.1.proj_in.weight"] == (320, 320)


def test_sdxl_full_te_vae_has_released_text_encoder_and_vae_sizes():
    """Forge builds SDXL's CLIP-L, OpenCLIP bigG and VAE from fixed configs: the weights must be full size."""
    _, vae, te = M.sdxl_configs(full_te_vae=True, unet_preset="forge-sdxl-small")
    spec_l, spec_g = M.sdxl_text_specs(te)
    lp, gp = "conditioner.embedders.0.transformer.text_model.", "conditioner.embedders.1.model."
    assert all(k.startswith(lp) for k in spec_l) and all(k.startswith(gp) for k in spec_g)
    assert len(spec_l) == 196 and sum(math.prod(s) for s in spec_l.values()) == 123_060_480
    assert spec_l[lp + "encoder.layers.11.mlp.fc1.weight"] == (3072, 768)
    assert lp + "encoder.layers.12.mlp.fc1.weight" not in spec_l
    assert spec_l[lp + "embeddings.token_embedding.weight"] == (49408, 768)
    assert spec_g[gp + "transformer.resblocks.31.attn.in_proj_weight"] == (3840, 1280)
    assert spec_g[gp + "transformer.resblocks.31.mlp.c_fc.weight"] == (5120, 1280)
    assert gp + "transformer.resblocks.32.ln_1.weight" not in spec_g
    assert spec_g[gp + "token_embedding.weight"] == (49408, 1280)
    assert spec_g[gp + "positional_embedding"] == (77, 1280)
    assert spec_g[gp + "text_projection"] == (1280, 1280)
    assert sum(math.prod(s) for s in spec_g.values()) == 694_659_841  # the released bigG text tower + scale
    v = M.vae_spec(vae)
    assert v["first_stage_model.decoder.up.3.block.0.conv1.weight"] == (512, 512, 3, 3)
    assert v["first_stage_model.encoder.conv_in.weight"] == (128, 3, 3, 3)
    _, small_vae, small_te = M.sdxl_configs()  # the default stays small
    assert (small_vae.ch, small_te.clip_l.num_hidden_layers, small_te.openclip_layers) == (32, 2, 2)


def test_sdxl_state_dict_keys_and_fixed_tensors(monkeypatch):
    """Every spec key is written, plus int64 position_ids and a scalar logit_scale in the chosen dtype."""
    monkeypatch.setattr(M, "random_tensors", lambda spec, seed=0, std=0.02, dtype=torch.float16:
                        {k: torch.empty(s, dtype=dtype, device="meta") for k, s in spec.items()})
    unet, vae, te = M.sdxl_configs(full_te_vae=True, unet_preset="forge-sdxl-small")
    sd = M.sdxl_state_dict(unet, vae, te, dtype=torch.float32)
    spec_l, spec_g = M.sdxl_text_specs(te)
    expected = {**M.unet_spec(unet), **M.vae_spec(vae), **spec_l, **spec_g}
    ids = "conditioner.embedders.0.transformer.text_model.embeddings.position_ids"
    assert set(sd) == set(expected) | {ids}
    assert all(tuple(sd[k].shape) == s for k, s in expected.items())
    assert sd[ids].dtype == torch.int64 and sd[ids].tolist() == [list(range(77))]
    scale = sd["conditioner.embedders.1.model.logit_scale"]
    assert scale.shape == () and scale.dtype == torch.float32
    assert scale.item() == pytest.approx(math.log(1 / 0.07))
    assert sd[next(iter(spec_g))].dtype == torch.float32


def test_cli_refuses_sd15_te_vae_flag_for_sdxl(tmp_path):
    with pytest.raises(SystemExit):
        M.main(["--out", str(tmp_path), "--kind", "sdxl", "--full-te-vae"])


def test_save_writes_metadata_in_sorted_order(tmp_path):
    """safetensors orders a multi-key metadata map at random per process; sorted, the file hash is stable."""
    from safetensors.torch import load_file

    meta = {k: str(i) for i, k in enumerate("fdbeca")}
    path = tmp_path / "x.safetensors"
    M._save({"w": torch.arange(6.0)}, str(path), meta)
    raw = path.read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    assert list(header["__metadata__"]) == sorted(meta)
    assert header["__metadata__"] == meta
    assert load_file(str(path))["w"].tolist() == list(range(6))
    assert not (tmp_path / "x.safetensors.tmp").exists()
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # readable like any file the user writes


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


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_text_encoder_outputs_have_a_non_zero_mean(kind):
    """The last LayerNorm's output averages to mean(bias) per token (weight 1): with bias 0 every
    token's mean is 0 and A1111's default emphasis divides 0 by 0 for a reweighted chunk."""
    if kind == "sd15":
        unet, vae, te = M.sd15_configs()
        sd = M.sd15_state_dict(unet, vae, te, dtype=torch.float32)
    else:
        unet, vae, te = M.sdxl_configs()
        sd = M.sdxl_state_dict(unet, vae, te, dtype=torch.float32)
    biases = [v for k, v in sd.items() if k.endswith(M.TEXT_FINAL_NORM_BIASES)]
    assert len(biases) == (1 if kind == "sd15" else 2)
    assert all(float(b.mean()) > 0.1 for b in biases)
    assert all(float(w.mean()) == 1.0 for k, w in sd.items()
               if k.endswith(("final_layer_norm.weight", "ln_final.weight")))


# ----------------------------------------------------------------------------- SD2.x and v-prediction

def test_sd2_full_size_spec_matches_released_sd21_layout():
    """v2-1_768-ema-pruned: 865,910,724 UNet parameters, linear proj_in, context 1024, head width 64;
    the text tower is open_clip's ViT-H-14 less ``visual`` (294 tensors), 24 resblocks of width 1024."""
    unet = M.unet_spec(M.sd2_unet_config("sd2-base"))
    assert len(unet) == 686 and sum(math.prod(s) for s in unet.values()) == 865_910_724
    p = "model.diffusion_model."
    assert unet[p + "input_blocks.1.1.proj_in.weight"] == (320, 320)  # linear, not a 1x1 conv
    assert unet[p + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] == (320, 1024)
    assert unet[p + "input_blocks.1.1.transformer_blocks.0.attn2.to_v.weight"] == (320, 1024)
    assert unet[p + "input_blocks.7.1.transformer_blocks.0.attn2.to_k.weight"] == (1280, 1024)
    assert unet[p + "middle_block.1.proj_in.weight"] == (1280, 1280)
    assert unet[p + "output_blocks.11.1.proj_out.weight"] == (320, 320)
    assert unet[M.V_MARKER_KEY] == (320,)
    assert p + "output_blocks.2.1.proj_in.weight" not in unet  # no attention at latent/8
    assert p + "label_emb.0.0.weight" not in unet
    te = M.sd2_text_spec()
    t = "cond_stage_model.model."
    assert all(k.startswith(t) for k in te)
    assert len(te) == 294 and sum(math.prod(s) for s in te.values()) == 354_032_641
    assert te[t + "transformer.resblocks.23.attn.in_proj_weight"] == (3072, 1024)
    assert te[t + "transformer.resblocks.23.attn.in_proj_bias"] == (3072,)
    assert te[t + "transformer.resblocks.23.attn.out_proj.weight"] == (1024, 1024)
    assert te[t + "transformer.resblocks.0.mlp.c_fc.weight"] == (4096, 1024)
    assert te[t + "transformer.resblocks.0.mlp.c_proj.weight"] == (1024, 4096)
    assert t + "transformer.resblocks.24.ln_1.weight" not in te
    assert te[t + "token_embedding.weight"] == (49408, 1024)
    assert te[t + "positional_embedding"] == (77, 1024)
    assert te[t + "text_projection"] == (1024, 1024)
    assert te[t + "ln_final.weight"] == (1024,) and te[t + "logit_scale"] == ()


def test_sd2_presets_keep_sd2_block_names_and_forge_shapes():
    """sd2-small has the released module names at 1/5 width; forge-sd2-small has model_channels 320,
    context 1024 and linear projections, which Forge's SD20 guess requires."""
    full = M.unet_spec(M.sd2_unet_config("sd2-base"))
    small = M.unet_spec(M.sd2_unet_config("sd2-small"))
    assert set(small) == set(full)
    p = "model.diffusion_model."
    assert small[p + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] == (64, 1024)
    forge = M.unet_spec(M.sd2_unet_config("forge-sd2-small"))
    assert set(forge) <= set(full) and M.V_MARKER_KEY in forge
    assert _input_depths(forge) == [1, 1, 1, 1, 1, 1, 0, 0]
    assert forge[p + "input_blocks.0.0.weight"] == (320, 4, 3, 3)
    assert forge[p + "input_blocks.8.1.proj_in.weight"] == (320, 320)
    assert forge[p + "middle_block.1.transformer_blocks.0.attn2.to_k.weight"] == (320, 1024)
    assert M.sd2_configs(full_te_vae=True)[1].ch == 128 and M.sd2_configs()[1].ch == 32


def _small_sd2_text(monkeypatch):
    """A 1-layer, 64-wide text tower instead of ViT-H (0.7 GB) for state-dict tests; its spec is tested
    above."""
    monkeypatch.setattr(M, "sd2_text_spec", lambda: M.openclip_text_spec(64, 1, vocab=16, proj_dim=64,
                                                                          prefix=M.SD2_TE_PREFIX))


def _guess_is_v(sd):
    """huggingface_guess SD20.model_type (Forge) / ComfyUI: std of the marker bias above 0.09."""
    return float(torch.std(sd[M.V_MARKER_KEY].float(), unbiased=False)) > 0.09


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_sd2_state_dict_marks_the_prediction_type(monkeypatch, prediction):
    _small_sd2_text(monkeypatch)
    unet, vae = M.sd2_configs()
    sd = M.sd2_state_dict(unet, vae, prediction, dtype=torch.float32)
    marker = sd[M.V_MARKER_KEY].float()
    if prediction == "v":
        assert 0.15 < float(marker.std(unbiased=False)) < 0.25 and _guess_is_v(sd)
        assert sd[M.V_PRED_KEY].numel() == 0
    else:
        assert float(marker.abs().max()) == 0.0 and not _guess_is_v(sd)
        assert M.V_PRED_KEY not in sd
    assert M.ZTSNR_KEY not in sd
    assert sd["cond_stage_model.model.logit_scale"].item() == pytest.approx(math.log(1 / 0.07))
    assert sd["alphas_cumprod"].shape == (1000,)
    other = {k: v for k, v in sd.items() if k not in (M.V_MARKER_KEY, M.V_PRED_KEY)}
    twin = M.sd2_state_dict(unet, vae, "eps" if prediction == "v" else "v", dtype=torch.float32)
    assert all(torch.equal(v, twin[k]) for k, v in other.items())  # only the markers differ


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_sd2_yaml_says_the_prediction_type(prediction):
    unet, vae = M.sd2_configs(unet_preset="forge-sd2-small")
    text = M.sd2_yaml(unet, vae, prediction)
    assert ('parameterization: "v"' in text) == (prediction == "v")
    assert "target: ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder" in text
    assert 'layer: "penultimate"' in text and "version:" not in text  # open_clip's own ViT-H-14
    for line in ("num_head_channels: 64", "use_linear_in_transformer: True", "context_dim: 1024",
                 "model_channels: 320", "channel_mult: [1, 1, 1, 1]", "attention_resolutions: [4, 2, 1]"):
        assert line in text
    yaml = pytest.importorskip("yaml")
    params = yaml.safe_load(text)["model"]["params"]
    assert params.get("parameterization", "eps") == prediction  # ldm's DDPM default is "eps"


@pytest.mark.parametrize("prediction, ztsnr", [("eps", False), ("v", False), ("v", True)])
def test_sdxl_prediction_keys_and_yaml(monkeypatch, prediction, ztsnr):
    monkeypatch.setattr(M, "random_tensors", lambda spec, seed=0, std=0.02, dtype=torch.float16:
                        {k: torch.empty(s, dtype=dtype, device="meta") for k, s in spec.items()})
    unet, vae, te = M.sdxl_configs()
    sd = M.sdxl_state_dict(unet, vae, te, prediction=prediction, ztsnr=ztsnr)
    assert (M.V_PRED_KEY in sd) == (prediction == "v") and (M.ZTSNR_KEY in sd) == ztsnr
    assert all(sd[k].numel() == 0 for k in (M.V_PRED_KEY, M.ZTSNR_KEY) if k in sd)
    text = M.sdxl_yaml(unet, vae, "/tok", prediction=prediction)
    scaling = "VScaling" if prediction == "v" else "EpsScaling"
    assert f"sgm.modules.diffusionmodules.denoiser_scaling.{scaling}" in text
    assert ("denoiser_weighting.VWeighting" in text) == (prediction == "v")
    if prediction == "eps":  # the eps yaml is what it was before v existed
        assert "prediction" not in text


def test_prediction_markers_refuse_ztsnr_without_v():
    with pytest.raises(ValueError):
        M.prediction_markers("eps", ztsnr=True)
    with pytest.raises(ValueError):
        M.prediction_markers("x0")


@pytest.mark.parametrize("argv", [["--kind", "sd15", "--prediction", "v"], ["--kind", "sdxl", "--ztsnr"],
                                  ["--kind", "sdxl", "--unet", "forge-sd2-small"],
                                  ["--kind", "sd2", "--unet", "forge-sd15-small"],
                                  ["--kind", "sd2", "--unet", "sdxl-small"]])
def test_cli_refuses_mismatched_prediction_and_presets(tmp_path, argv):
    with pytest.raises(SystemExit):
        M.main(["--out", str(tmp_path), *argv])


def test_write_sd2_v_files(monkeypatch, tmp_path):
    from safetensors import safe_open

    _small_sd2_text(monkeypatch)
    assert M.main(["--out", str(tmp_path), "--kind", "sd2", "--prediction", "v", "--dtype", "float32"]) == 0
    path = tmp_path / "scfg-tiny-sd2-v.safetensors"
    assert (tmp_path / "scfg-tiny-sd2-v.yaml").read_text().count('parameterization: "v"') == 1
    assert not (tmp_path / "clip-tokenizer").exists()  # SD2 tokenizes with OpenCLIP's own BPE
    with safe_open(str(path), "pt") as fh:
        assert fh.metadata() == {"scfg_prediction": "v", "scfg_test_model": "sd2", "scfg_ztsnr": "False"}
        sd = {k: fh.get_tensor(k) for k in fh.keys()}
    assert _guess_is_v(sd) and M.V_PRED_KEY in sd
    assert sd["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"].shape[1] == 64
    assert sd["model.diffusion_model.input_blocks.1.1.proj_in.weight"].shape == (64, 64)


def test_vae_posterior_is_nearly_a_point_like_a_trained_one():
    """img2img encodes with posterior.sample() on the global RNG: the written VAE's log-variance must
    sit at ldm's clamp (-30) so that an encoded image does not depend on what ran before."""
    unet, vae, te = M.sd15_configs(te_layers=1)
    sd = M.sd15_state_dict(unet, vae, te)
    weight = sd["first_stage_model.quant_conv.weight"].float()[..., 0, 0]
    bias = sd["first_stage_model.quant_conv.bias"].float()
    moments = torch.randn(64, weight.shape[1]) @ weight.T + bias  # encoder outputs of unit scale
    mean, logvar = moments.chunk(2, dim=1)
    assert (logvar.clamp(-30, 20).mul(0.5).exp() < 1e-5).all() and mean.abs().max() < 1
    assert (sd["first_stage_model.post_quant_conv.bias"] == 0).all()

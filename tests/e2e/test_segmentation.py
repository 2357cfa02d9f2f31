"""End-to-end: S-CFG's regions on learned attention, in the real AUTOMATIC1111, against ground truth.

Teacher-forced: a held-out image of bench/quality's data set is noised by img2img (denoising
strength DENOISE) and denoised with its own caption and S-CFG on, with the named API arg
``raw_maps``; the status route returns each step's token labels on the mask grid. Each named
object's region (pixels won by its colour or its shape word) is compared with its true mask,
reduced to the same grid, by IoU; controls: the same regions against the masks of another image
(wrong sample) and against a random labelling (random). A row swap, a token offset or a transposed
grid turns the IoU into the controls'.

Needs SCFG_A1111_URL and the checkpoint of bench/quality (``scfg-shapes-sd15``, written from the
committed fixture by ``python -m bench.quality.convert --from-fixture``, see bench/quality/README.md)
in the WebUI's checkpoint list; skipped, saying why, otherwise.
Prints the IoU table (SCFG_SEG_OUT=file appends it as JSON).
"""

import base64
import io
import json
import os
import random
import re

import numpy as np
import pytest

from bench.quality import data
from tests.e2e.client import api_call, checkpoint_titles

URL = os.environ.get("SCFG_A1111_URL", "").rstrip("/")
MODEL = "scfg-shapes-sd15"
DENOISE, STEPS, CFG, SEED = 0.6, 20, 5.0, 11
IMAGES = 8
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(
    not URL, reason="SCFG_A1111_URL is not set: segmentation runs in a real A1111")]


def call(path, body=None, timeout=1800):
    return api_call(URL, path, body, timeout)


@pytest.fixture(scope="module", autouse=True)
def shapes_model():
    try:
        _, models = call("/sdapi/v1/sd-models", timeout=10)
    except OSError as error:
        pytest.skip(f"no WebUI at SCFG_A1111_URL={URL}: {error}")
    titles = checkpoint_titles(models, MODEL)
    if not titles:
        pytest.skip(f"no checkpoint {MODEL} in the WebUI (bench/quality/README.md: convert --from-fixture)")
    before = call("/sdapi/v1/options")[1]["sd_model_checkpoint"]
    assert call("/sdapi/v1/options", {"sd_model_checkpoint": titles[0]})[0] == 200
    yield
    call("/sdapi/v1/options", {"sd_model_checkpoint": before})


def png_b64(image: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def object_tokens(caption: str, objects) -> list[tuple[int, int]]:
    """Context positions of each object's colour and shape word, in caption order. START is 0; CLIP's
    pre-tokenizer splits words from punctuation, and every word of this data's captions is one BPE
    token of the CLIP vocabulary (colours, shapes, backgrounds, "a", "an", "and", "on")."""
    words = re.findall(r"[a-z]+|[^\sa-z]+", caption)
    found, at = [], 0
    for obj in objects:
        colour = words.index(obj.colour, at)
        shape = words.index(obj.shape, colour)
        found.append((colour + 1, shape + 1))
        at = shape + 1
    return found


def grid_masks(labels: np.ndarray, count: int, grid: tuple[int, int]) -> list[np.ndarray]:
    """The true mask of each object reduced to the mask grid: a cell is the object's where it covers
    half of the cell or more."""
    h, w = grid
    cells = labels.reshape(h, labels.shape[0] // h, w, labels.shape[1] // w)
    return [(cells == k + 1).mean((1, 3)) >= 0.5 for k in range(count)]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def segment_maps(samples, seed=SEED, prompt=None, **scfg) -> dict[tuple[int, int], dict]:
    """Teacher-forced img2img of the samples (a batch; the first one's caption unless ``prompt``) with
    S-CFG; the maps of the last step of each (image, sub-prompt)."""
    height, width = samples[0].image.shape[:2]
    args = {"enabled": True, "raw_maps": True, **scfg}
    body = {"init_images": [png_b64(s.image) for s in samples], "prompt": prompt or samples[0].caption,
            "negative_prompt": "", "seed": seed, "steps": STEPS, "cfg_scale": CFG, "width": width,
            "height": height, "denoising_strength": DENOISE, "sampler_name": "Euler",
            "batch_size": len(samples), "save_images": False, "send_images": False,
            "alwayson_scripts": {"S-CFG": {"args": [args]}}}
    code, answer = call("/sdapi/v1/img2img", body)
    assert code == 200, answer
    run = call("/scfg/v1/status")[1]["last_run"]
    assert run["steps_applied"] > 0 and run["maps"], run
    last = {}
    for m in run["maps"]:
        key = (m["image"], m["sub_prompt"])
        if m["step"] >= last.get(key, {"step": -1})["step"]:
            last[key] = m
    return last


def segment(samples, seed=SEED, prompt=None, **scfg) -> list[np.ndarray]:
    """The token labels [h, w] of the last step of each image's first sub-prompt."""
    maps = segment_maps(samples, seed, prompt, **scfg)
    return [np.array(maps[(i, 0)]["labels"]) for i in range(len(samples))]


def scores(samples, labels_per_image, positions_per_image=None) -> dict:
    """IoU of each object's region (the pixels its colour or shape word wins) with its true mask, and
    the controls. positions_per_image[i][k]: the context positions of image i's object k (default:
    its words in the image's own caption)."""
    rng = random.Random(0)
    ours, wrong, rand = [], [], []
    for i, (sample, labels) in enumerate(zip(samples, labels_per_image, strict=True)):
        grid = labels.shape
        truth = grid_masks(sample.labels, len(sample.objects), grid)
        other = samples[(i + 1) % len(samples)]
        other_truth = grid_masks(other.labels, len(other.objects), grid)
        positions = (positions_per_image[i] if positions_per_image
                     else object_tokens(sample.caption, sample.objects))
        shuffled = labels.flatten().copy()
        rng.shuffle(shuffled)
        shuffled = shuffled.reshape(grid)
        for k, words in enumerate(positions):
            region = np.isin(labels, list(words))
            ours.append(iou(region, truth[k]))
            wrong.append(iou(region, other_truth[k % len(other_truth)]))
            rand.append(iou(np.isin(shuffled, list(words)), truth[k]))
    return {"objects": len(ours), "iou": round(float(np.mean(ours)), 3),
            "wrong_sample": round(float(np.mean(wrong)), 3), "random": round(float(np.mean(rand)), 3)}


def foreground_scores(samples, maps_per_image) -> dict:
    """IoU of S-CFG's foreground (the benchmark region "foreground", eq. 14) with the union of the true
    object masks, and the wrong-sample control."""
    ours, wrong = [], []
    for i, (sample, m) in enumerate(zip(samples, maps_per_image, strict=True)):
        fg = np.array(m["foreground"]) > 0.5
        ours.append(iou(fg, any_object(sample, fg.shape)))
        wrong.append(iou(fg, any_object(samples[(i + 1) % len(samples)], fg.shape)))
    return {"foreground_iou": round(float(np.mean(ours)), 3),
            "foreground_wrong": round(float(np.mean(wrong)), 3)}


def any_object(sample, grid) -> np.ndarray:
    return np.any(grid_masks(sample.labels, len(sample.objects), grid), axis=0)


def assert_far_above_controls(result):
    controls = max(result["wrong_sample"], result["random"])
    assert result["iou"] > max(MIN_IOU, CONTROL_FACTOR * controls), result


def report(name, result):
    print(f"\nsegmentation {name}: {json.dumps(result)}")
    out = os.environ.get("SCFG_SEG_OUT")
    if out:
        with open(out, "a") as file:
            file.write(json.dumps({"case": name, **result}) + "\n")


HELD_OUT = [data.sample(0, i, "heldout") for i in range(IMAGES)]


@pytest.mark.parametrize("preset", ["official", "paper"])
@pytest.mark.parametrize("region", ["foreground", "mean"])
def test_object_regions_land_on_the_objects(preset, region):
    """Levels latent/2 and latent/4 (a 16x16 grid at 256²; the default latent/4 + latent/8 give 8x8,
    reported by the next test). The benchmark region changes the rate (and so the trajectory), not how
    regions are found: both are measured, and the foreground (eq. 14) against all the objects."""
    maps = [segment_maps([s], preset=preset, region=region, levels="2,4")[(0, 0)] for s in HELD_OUT]
    labels = [np.array(m["labels"]) for m in maps]
    result = {**scores(HELD_OUT, labels), **foreground_scores(HELD_OUT, maps)}
    report(f"one image per request, preset {preset}, region {region}, levels 2,4, grid {labels[0].shape}",
           result)
    assert_far_above_controls(result)


def test_default_levels_reported():
    labels = [segment([s])[0] for s in HELD_OUT]
    result = scores(HELD_OUT, labels)
    report(f"one image per request, preset official, levels auto, grid {labels[0].shape}", result)
    assert labels[0].shape == (data.SIZE // 32, data.SIZE // 32)  # latent/4 is the finest default level


def mirrored(sample, k: int):
    """The sample with its layout flipped (k = 0..3: as is, left-right, up-down, both): the same
    caption, other places."""
    from dataclasses import replace

    flip = {0: lambda a: a, 1: np.fliplr, 2: np.flipud, 3: lambda a: np.flipud(np.fliplr(a))}[k]
    return replace(sample, image=np.ascontiguousarray(flip(sample.image)),
                   labels=np.ascontiguousarray(flip(sample.labels)))


def test_a_batch_gives_each_image_its_own_regions():
    """Four layouts of one held-out image in one request: each image's regions equal those of the
    same image run alone with its seed (the set VAE's posterior is deterministic, so img2img is
    too); a swap of rows between the images would give each another's."""
    batch = [mirrored(HELD_OUT[2], k) for k in range(4)]
    together = segment(batch, levels="2,4")
    alone = [segment([sample], seed=SEED + i, levels="2,4")[0] for i, sample in enumerate(batch)]
    agree = [float((a == b).mean()) for a, b in zip(together, alone, strict=True)]
    report("batch of 4 mirrored layouts, levels 2,4", {**scores(batch, together), "agree_alone": agree})
    assert min(agree) >= 0.95, agree
    assert float((together[0] == together[1]).mean()) < 0.9, "the layouts gave the same regions"


# Set from the committed model (bench/quality/fixture, 2026-12-02, A1111 v1.10.1): the weakest cases
# measured IoU 0.066 (official, square) against controls <= 0.022 (3.0x), and 0.122 (AND, paper)
# against the other sub-prompt's object 0.058 (2.1x). Mutations measured on the BREAK case: words
# read one chunk early 0.000, one token late 0.036 (both below MIN_IOU); a transposed grid still
# scores 0.05 on square images, which the non-square case's grid-shape check catches. The margins
# are what this small model allows, not wide.
MIN_IOU, CONTROL_FACTOR = 0.04, 1.5


def widened(sample, width: int):
    """The sample on a wider canvas (background on the right): the same caption and objects, a
    non-square image whose mask grid is wider than high, so a transposed grid cannot match."""
    from dataclasses import replace

    pad = width - sample.image.shape[1]
    colour = np.array(data.BACKGROUNDS[sample.background], np.uint8)
    image = np.concatenate([sample.image, np.broadcast_to(colour, (sample.image.shape[0], pad, 3))], 1)
    labels = np.concatenate([sample.labels, np.zeros((sample.labels.shape[0], pad), sample.labels.dtype)], 1)
    return replace(sample, image=np.ascontiguousarray(image), labels=labels)


def test_non_square_images_keep_their_grid_orientation():
    wide = [widened(s, 384) for s in HELD_OUT]
    labels = [segment([s], preset="paper", levels="2,4")[0] for s in wide]
    result = scores(wide, labels)
    report(f"256x384 (h x w), preset paper, levels 2,4, grid {labels[0].shape}", result)
    assert labels[0].shape == (256 // 16, 384 // 16)
    assert_far_above_controls(result)


def sub_prompt(sample, k: int) -> str:
    obj = sample.objects[k]
    return f"a {obj.colour} {obj.shape} on a {sample.background} background"


MULTI = [s for s in (data.sample(0, i, "heldout") for i in range(40)) if len(s.objects) >= 2][:IMAGES]


def test_and_sub_prompts_each_find_their_own_object():
    """One AND sub-prompt per object ("a red circle on a white background AND a blue square on ...");
    sub-prompt k's words are at positions 2 (colour) and 3 (shape) of its own context, and its region
    must land on object k, not on the object of another sub-prompt."""
    per_object, swapped = [], []
    for sample in MULTI:
        count = len(sample.objects)
        maps = segment_maps([sample], prompt=" AND ".join(sub_prompt(sample, k) for k in range(count)),
                            preset="paper", levels="2,4")
        assert sorted(maps) == [(0, k) for k in range(count)], sorted(maps)
        truth = grid_masks(sample.labels, count, np.array(maps[(0, 0)]["labels"]).shape)
        for k in range(count):
            region = np.isin(np.array(maps[(0, k)]["labels"]), [2, 3])
            per_object.append(iou(region, truth[k]))
            swapped.append(iou(region, truth[(k + 1) % count]))
    result = {"objects": len(per_object), "iou": round(float(np.mean(per_object)), 3),
              "other_sub_prompts_object": round(float(np.mean(swapped)), 3)}
    report("AND: one sub-prompt per object, preset paper, levels 2,4", result)
    assert result["iou"] > max(MIN_IOU, CONTROL_FACTOR * result["other_sub_prompts_object"]), result


def test_a_prompt_past_75_tokens_with_break_finds_the_objects_in_its_last_chunk():
    """79 tokens naming no object ("a white background, a white background, ...": A1111 splits them into
    two chunks), then BREAK and the caption, which therefore starts the third chunk: its words sit at
    154 + their caption positions. An offset of the chunks' positions gives the controls' IoU."""
    labels, positions = [], []
    for sample in HELD_OUT:
        filler = ", ".join([f"a {sample.background} background"] * 20)
        labels.append(segment([sample], prompt=f"{filler} BREAK {sample.caption}", preset="paper",
                              levels="2,4")[0])
        positions.append([(2 * 77 + c, 2 * 77 + s) for c, s in object_tokens(sample.caption, sample.objects)])
    result = scores(HELD_OUT, labels, positions)
    report("past 75 tokens + BREAK, caption in chunk 3, preset paper, levels 2,4", result)
    assert_far_above_controls(result)

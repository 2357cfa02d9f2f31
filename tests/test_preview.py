import hashlib

import torch
from PIL import Image

from scfg_ext.preview import OTHER, PreviewStep, overlay, palette, render, steps_to_record, word_groups

from .synthetic import region_labels

PROMPT = [None, "an</w>", "astro", "naut</w>", "riding</w>", "a</w>", "horse</w>", None] + [None] * 69


def test_word_groups_merge_sub_words_and_mark_specials():
    groups, names = word_groups(PROMPT)
    assert names == ["an", "astronaut", "riding", "a", "horse"]
    assert groups[:8] == [-1, 0, 1, 1, 2, 3, 4, -1]
    assert set(groups[8:]) == {-1}


def test_multi_chunk_prompt_keeps_words_of_both_chunks():
    first = [None] + ["cat</w>"] * 74 + ["sky"] + [None]           # a word cut by the chunk boundary
    second = [None, "line</w>", "tree</w>"] + [None] * 74
    groups, names = word_groups(first + second)
    assert names[-3:] == ["sky", "line", "tree"] and len(names) == 77
    assert groups[77] == -1 and groups[78] == 75 and groups[79] == 76


def step(i, labels):
    rate = torch.linspace(0.8, 2.0, 64 * 64).view(64, 64)
    return PreviewStep(i, 20, labels, (labels != 0).float(), rate, 7.5)


def test_regions_are_drawn_in_their_words_colours():
    labels = torch.zeros(16, 16, dtype=torch.long)
    labels[:, 8:] = 6                                   # right half: "horse" (position 6, word 4)
    labels[:8, :8] = 2                                  # top-left: "astro" -> "astronaut" (word 1)
    img = render([step(5, labels)], PROMPT)
    colours = palette(5)
    px = img.load()
    x0, y0 = 8, 8 + 20                                 # first panel, below its caption
    scale = 192 // 16
    assert px[x0 + 12 * scale, y0 + 4 * scale] == colours[4]
    assert px[x0 + 2 * scale, y0 + 2 * scale] == colours[1]
    assert px[x0 + 2 * scale, y0 + 12 * scale] == (90, 90, 90)   # START region: background/other


def test_render_is_deterministic_and_sized_for_reading():
    labels = region_labels(8, 12) + 1
    a = render([step(5, labels), step(20, labels)], PROMPT, "image 1")
    b = render([step(5, labels), step(20, labels)], PROMPT, "image 1")
    assert hashlib.sha256(a.tobytes()).digest() == hashlib.sha256(b.tobytes()).digest()
    assert a.width >= 3 * 192 and a.height >= 2 * 192


def test_and_prompts_render_one_legend_each():
    other = [None, "red</w>", "car</w>"] + [None] * 74
    assert word_groups(other)[1] == ["red", "car"]
    assert OTHER == "background/other"
    a, b = render([step(1, region_labels(8, 8))], PROMPT), render([step(1, region_labels(8, 8))], other)
    assert a.tobytes() != b.tobytes()


def test_steps_to_record_spread_over_the_run():
    assert steps_to_record(20, 4) == {4, 9, 14, 19}
    assert steps_to_record(3, 4) == {0, 1, 2}
    assert steps_to_record(0, 4) == set()


def test_split_and_drops_weights():
    from scfg_ext.preview import split_and
    assert split_and("a cat :1.2 AND a dog:0.5 AND ANDROID") == ["a cat", "a dog", "ANDROID"]
    assert split_and("plain") == ["plain"]


def test_overlay_tints_each_word_region_over_the_image_and_names_it():
    labels = torch.zeros(8, 8, dtype=torch.long)
    labels[:, 4:] = 6                                   # right half: "horse" (word 4)
    labels[:4, :4] = 3                                  # top-left quarter: "naut" -> "astronaut" (word 1)
    image = Image.new("RGB", (64, 64), (100, 100, 100))
    out = overlay(image, step(20, labels), PROMPT, alpha=0.5)
    assert out.size == image.size
    px, colours = out.load(), palette(5)
    # a pixel far from the edges and from the written word: half image, half the word's colour
    assert px[60, 60] == tuple(round((100 + c) / 2) for c in colours[4])
    assert px[3, 45] == (100, 100, 100)                 # START (no word): untouched
    assert px[32, 60] == (255, 255, 255)                # the outline between regions
    # the word is written at its region's centre: the centre differs from a plain tint
    plain = overlay(image, step(20, labels), PROMPT, alpha=0.5, min_share=1.1)
    assert plain.crop((36, 24, 64, 40)).tobytes() != out.crop((36, 24, 64, 40)).tobytes()
    assert plain.load()[48, 32] == px[60, 60]


def test_overlay_follows_the_image_size_not_the_grid():
    labels = torch.full((4, 6), 6, dtype=torch.long)
    out = overlay(Image.new("RGB", (96, 64)), step(1, labels), PROMPT)
    assert out.size == (96, 64)


def test_raw_maps_record_every_step_and_reach_the_status_as_lists():
    """API raw_maps: every step of every (image, sub-prompt), labels/foreground on the mask grid and
    the rate at latent size, JSON-ready; without it the status has no maps and previews keep their
    few steps."""
    import json
    from types import SimpleNamespace

    from scfg_ext.report import RunReport

    labels = torch.arange(2 * 4 * 6).reshape(2, 4, 6) % 5
    result = SimpleNamespace(labels=labels, foreground=(labels[:, None] > 2).float(),
                             rate=torch.rand(2, 1, 8, 12) + 0.8)
    raw, plain = RunReport(raw_maps=True), RunReport(preview_steps=2)
    for step in range(10):
        for report in (raw, plain):
            report.record(step, 10, result, [(0, 0), (1, 0)], [7.0, 7.0])
    maps = json.loads(json.dumps(raw.as_dict()))["maps"]
    assert [(m["image"], m["step"]) for m in maps] == [(i, s) for i in (0, 1) for s in range(1, 11)]
    first = maps[0]
    assert first["labels"] == labels[0].tolist() and first["foreground"] == (labels[0] > 2).float().tolist()
    assert len(first["rate"]) == 8 and len(first["rate"][0]) == 12 and first["total"] == 10
    assert "maps" not in plain.as_dict() and len(plain.previews[(0, 0)]) == 2
    # the previews drawn show their own steps either way
    both = RunReport(raw_maps=True, preview_steps=2)
    for step in range(10):
        both.record(step, 10, result, [(0, 0), (1, 0)], [7.0, 7.0])
    assert len(both.previews[(0, 0)]) == 10
    shown = [s.step for s in both.preview_shots((0, 0))]
    assert shown == [s.step for s in plain.preview_shots((0, 0))] == [5, 10]

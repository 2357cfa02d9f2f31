import hashlib

import torch

from scfg_ext.preview import OTHER, PreviewStep, palette, render, steps_to_record, word_groups

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

"""START positions per row: every 77-token chunk starts with START, except a host's padding."""

import torch

from scfg_ext.attention import head_mean_probs, logits_dtype
from scfg_ext.segment import LayerFusion, as_start_mask, chunk_starts, start_vs_rest


def context(chunks: int, padded_from: int | None = None, seed: int = 0) -> torch.Tensor:
    """[T, E] keys of `chunks` prompt chunks; from chunk `padded_from` on, A1111's padding of an
    AND sub-prompt: the last real vector repeated (reconstruct_multicond_batch)."""
    keys = torch.randn(77 * chunks, 16, generator=torch.Generator().manual_seed(seed))
    if padded_from is not None:
        keys[77 * padded_from:] = keys[77 * padded_from - 1]
    return keys


def test_every_chunk_of_a_long_prompt_starts_with_start():
    starts = chunk_starts(context(3)[None])
    assert starts[0].nonzero().flatten().tolist() == [0, 77, 154]


def test_padding_by_repetition_is_not_a_start():
    """An AND sub-prompt of one chunk batched with one of three: its 77 and 154 are padding."""
    keys = torch.stack([context(3), context(3, padded_from=1, seed=1), context(3, padded_from=2, seed=2)])
    starts = chunk_starts(keys)
    assert [row.nonzero().flatten().tolist() for row in starts] == [[0, 77, 154], [0], [0, 77]]


def test_padding_detection_survives_projection_rounding():
    """Keys are to_k(context): identical context vectors may come out of a GEMM a little apart."""
    keys = context(2, padded_from=1)
    keys[77:] += 1e-6 * torch.randn(77, 16, generator=torch.Generator().manual_seed(3))
    assert chunk_starts(keys[None])[0].nonzero().flatten().tolist() == [0]


def test_start_masks_from_lists_and_per_row_lists():
    assert as_start_mask([0, 77], 2, 154).sum(1).tolist() == [2, 2]
    mask = as_start_mask([[0, 77], [0]], 2, 154)
    assert mask[0, 77] and not mask[1, 77] and mask[:, 0].all()


def test_start_vs_rest_sums_each_rows_own_starts():
    maps = torch.rand(2, 154, 3, 3)
    mask = as_start_mask([[0, 77], [0]], 2, 154)
    out = start_vs_rest(maps, mask)
    torch.testing.assert_close(out[0, 0], maps[0, 0] + maps[0, 77])
    torch.testing.assert_close(out[1, 0], maps[1, 0])
    torch.testing.assert_close(out[:, 0] + out[:, 1], maps.sum(1))


def test_a_padded_row_gets_a_different_foreground_than_a_wrong_start():
    """Regression: counting the padding at 77 as START moves pixels into the background."""
    g = torch.Generator().manual_seed(4)
    maps = torch.softmax(torch.randn(1, 64, 154, generator=g) * 3, -1)
    maps[..., 77] += 0.05  # the padding copies of the last vector draw some attention
    right = LayerFusion("official", (8, 8), [[0]])
    wrong = LayerFusion("official", (8, 8), [[0, 77]])
    right.add(maps, (8, 8))
    wrong.add(maps, (8, 8))
    assert not torch.equal(right.result().start_rest, wrong.result().start_rest)


def test_upcast_keeps_logits_fp32_for_half_queries():
    q = torch.randn(1, 4, 8).half()
    assert logits_dtype(q) == torch.float32  # CPU: always fp32
    meta = q.to("meta")
    assert logits_dtype(meta) == torch.float16  # a non-CPU device keeps the UNet's precision
    assert logits_dtype(meta, upcast=True) == torch.float32
    out = head_mean_probs(q, q, 2, upcast=True)
    assert out.dtype == torch.float32

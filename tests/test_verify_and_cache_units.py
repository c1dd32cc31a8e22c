"""The verifier, the processor view and the cache helpers on hand-built tensors, one behaviour at a time."""

from __future__ import annotations

import pytest
import torch

import dflash_hf.core.verify_dflash as verify_module
from dflash_hf.core.cache_dflash import DraftCache, compaction_order, left_aligned_mask
from dflash_hf.core.transformers_compat import patched_signature_problems
from dflash_hf.core.verify_dflash import BatchProcessorView, BlockVerifier

VOCAB = 11
DRAFTS = 5
PEAK = 60.0  # a logit gap that makes softmax one-hot in float32: sampling is then deterministic


def peaked(tokens: list[list[int]]) -> torch.Tensor:
    """Scores [R, T, V] whose every slot puts (almost) all probability on the given token."""
    scores = torch.zeros(len(tokens), len(tokens[0]), VOCAB)
    for r, row in enumerate(tokens):
        for t, token in enumerate(row):
            scores[r, t, token] = PEAK
    return scores


def case(accepted: int) -> tuple[list[int], list[int]]:
    """Target picks 1, 2, 3, …; drafts agree for ``accepted`` slots, then disagree (token 0) from there on."""
    target = [1 + t for t in range(DRAFTS + 1)]
    drafts = [target[t] if t < accepted else 0 for t in range(DRAFTS)]
    return target, drafts


@pytest.fixture(params=["kernels", "portable"])
def backend(request, monkeypatch):
    if request.param == "portable":
        monkeypatch.setattr(verify_module, "_kernel_module", lambda: None)
    return request.param


@pytest.mark.parametrize("mode", ["greedy", "strict", "ratio"])
def test_every_acceptance_count(mode, backend):
    if mode == "ratio" and backend == "portable":
        with pytest.raises(ValueError, match="needs the dflash_hf package"):
            BlockVerifier(True, "ratio", torch.device("cpu"))
        return
    torch.manual_seed(0)
    verifier = BlockVerifier(mode != "greedy", "strict" if mode == "greedy" else mode, torch.device("cpu"))
    rows = [case(a) for a in range(DRAFTS + 1)]  # one row per acceptance count 0 … DRAFTS
    scores = peaked([target for target, _ in rows])
    drafts = torch.tensor([d for _, d in rows])
    draft_scores = peaked([d for _, d in rows]) if mode == "ratio" else None
    num_drafts = torch.full((len(rows),), DRAFTS)
    positions = torch.arange(len(rows)) + 7
    accepted, next_token = verifier.verify(scores, drafts, num_drafts, positions, draft_scores)
    assert accepted.tolist() == list(range(DRAFTS + 1))
    assert next_token.tolist() == [rows[a][0][a] for a in range(DRAFTS + 1)]  # the target's own token there


def test_a_row_verifies_only_its_own_number_of_drafts(backend):
    verifier = BlockVerifier(False, "auto", torch.device("cpu"))
    target, drafts = case(DRAFTS)  # every draft right
    scores = peaked([target, target])
    accepted, next_token = verifier.verify(scores, torch.tensor([drafts, drafts]), torch.tensor([DRAFTS, 2]),
                                           torch.tensor([3, 3]))
    assert accepted.tolist() == [DRAFTS, 2]
    assert next_token.tolist() == [target[DRAFTS], target[2]]


def test_keyed_draft_sampling_does_not_depend_on_the_batch():
    torch.manual_seed(3)
    verifier = BlockVerifier(True, "ratio", torch.device("cpu"))
    scores = torch.randn(3, DRAFTS, VOCAB)
    positions = torch.tensor([4, 9, 2])
    together = verifier.sample_drafts(scores, positions)
    alone = torch.cat([verifier.sample_drafts(scores[r : r + 1], positions[r : r + 1]) for r in range(3)])
    assert torch.equal(together, alone)


def test_processor_view_gives_each_row_its_batch_index_and_own_prefix():
    seen = []

    def processor(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        seen.append(ids.clone())
        return scores + torch.arange(ids.shape[0])[:, None] * 100 + ids.shape[1]

    view = BatchProcessorView(processor, num_rows=3, pad_token=0)
    sequences = [torch.tensor([5, 6]), torch.tensor([7, 8, 9]), torch.tensor([4])]
    logits = torch.zeros(2, 2, VOCAB)  # live rows 2 and 0, one draft each
    drafts = torch.tensor([[1], [2]])
    out = view.block_scores(logits, [2, 0], sequences, drafts)
    # live row i is batch row [2, 0][i]; slot t is scored at length len(sequence) + t, at its batch index.
    assert out[0, 0, 0] == 200 + 1 and out[0, 1, 0] == 200 + 2
    assert out[1, 0, 0] == 0 + 2 and out[1, 1, 0] == 0 + 3
    call = next(ids for ids in seen if ids.shape[1] == 2)  # row 2 at slot 1 and row 0 at slot 0 share length 2
    assert call[2].tolist() == [4, 1] and call[0].tolist() == [5, 6] and call[1].tolist() == [7, 8]


def test_processor_view_without_processors_is_the_logits():
    logits = torch.randn(2, 3, VOCAB, dtype=torch.float64)
    out = BatchProcessorView(None, 2, None).block_scores(logits, [0, 1], [torch.tensor([1])] * 2, torch.zeros(2, 2))
    assert out.dtype == torch.float32 and torch.allclose(out, logits.float())


def test_compaction_order_puts_each_rows_live_slots_last_in_order():
    real = torch.tensor([[1, 0, 1, 1, 0, 1], [0, 0, 1, 0, 0, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    order, keep = compaction_order(real)
    assert order.shape == (3, 6)
    assert order[0, -4:].tolist() == [0, 2, 3, 5] and order[1, -2:].tolist() == [2, 5]
    assert keep.sum(dim=1).tolist() == [4, 2, 6]
    assert torch.equal(left_aligned_mask(real.long()).bool(), keep)


def test_draft_cache_drop_from_forgets_later_positions():
    cache = DraftCache(keys=[torch.arange(10.0).view(1, 1, 10, 1)], values=[torch.arange(10.0).view(1, 1, 10, 1)],
                       positions=[torch.arange(10)[None]])
    cache.drop_from(6)
    assert cache.length() == 6 and cache.positions[0].tolist() == [[0, 1, 2, 3, 4, 5]]
    assert cache.keys[0].flatten().tolist() == [0, 1, 2, 3, 4, 5]


def entries(first: int, count: int, rows: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys [rows, 1, count, 2] whose values name their row and position, and the positions [rows, count]."""
    positions = torch.arange(first, first + count).repeat(rows, 1)
    keys = (positions + 100 * torch.arange(rows)[:, None]).float()[:, None, :, None].expand(-1, 1, -1, 2)
    return keys.contiguous(), positions


def test_draft_cache_appends_into_its_storage_and_lends_the_block_room():
    """Appends write only the new entries (the cache stays a view of one storage while it has room); the block
    goes after the cache without becoming part of it; tensors set from outside are moved into storage again."""
    cache = DraftCache()
    keys, positions = entries(0, 5)
    cache.append(0, keys, -keys, positions, room=3)
    storage = cache.keys[0].untyped_storage().data_ptr()
    block, _ = entries(5, 3)
    k, v = cache.with_block(0, block, -block)
    assert torch.equal(k, torch.cat((keys, block), dim=2)) and torch.equal(v, -k)
    assert k.untyped_storage().data_ptr() == storage and cache.length() == 5  # the block is not committed

    more, more_positions = entries(5, 2)  # overwrites the block's room
    cache.append(0, more, -more, more_positions)
    assert cache.keys[0].untyped_storage().data_ptr() == storage
    assert torch.equal(cache.keys[0], torch.cat((keys, more), dim=2)) and torch.equal(cache.values[0], -cache.keys[0])
    assert cache.positions[0].tolist() == [list(range(7))] * 2

    cache.drop_from(4)  # a prefix view of the storage: found there again, no copy
    tail, tail_positions = entries(4, 1)
    cache.append(0, tail, -tail, tail_positions)
    assert cache.keys[0].untyped_storage().data_ptr() == storage and cache.positions[0].tolist() == [[0, 1, 2, 3, 4]] * 2

    cache.select_rows(torch.tensor([1]))  # a new tensor: the next append moves it into fresh storage
    last, last_positions = entries(5, 1, rows=1)
    cache.append(0, last + 100, -(last + 100), last_positions)
    assert cache.keys[0].untyped_storage().data_ptr() != storage
    assert cache.keys[0][0, 0, :, 0].tolist() == [100.0, 101.0, 102.0, 103.0, 104.0, 105.0]
    assert cache.positions[0].tolist() == [[0, 1, 2, 3, 4, 5]] and torch.equal(cache.values[0], -cache.keys[0])

    storages = {cache.keys[0].untyped_storage().data_ptr()}
    for first in range(6, 200):  # growth: storage is replaced only now and then, and never loses an entry
        one, one_positions = entries(first, 1, rows=1)
        cache.append(0, one + 100, -(one + 100), one_positions)
        storages.add(cache.keys[0].untyped_storage().data_ptr())
    assert cache.positions[0].tolist() == [list(range(200))]
    assert cache.keys[0][0, 0, :, 1].tolist() == [100.0 + p for p in range(200)]
    assert 2 <= len(storages) <= 5  # capacity doubles: a handful of copies for 194 appends, not one per append


def test_private_generate_signatures_are_what_the_patch_expects():
    """Fails loudly when a transformers release changes a private method the generate patch wraps."""
    assert patched_signature_problems() == []

"""Batched DFlash: every row of a left-padded batch equals plain generate on that prompt alone."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import VOCAB, make_drafter, make_target
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from dflash_hf.core.cache_dflash import COMPACT_MIN_HOLES
from dflash_hf.core.draft_dflash import DraftSession
from dflash_hf.core.modeling_dflash import DraftCache

PROMPT_LENGTHS = (3, 11, 6, 1)


def prompts(lengths=PROMPT_LENGTHS, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g) for n in lengths]


def left_pad(rows: list[torch.Tensor], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(r.shape[0] for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - row.shape[0] :] = row
        mask[i, width - row.shape[0] :] = 1
    return ids, mask


def generated(out: torch.Tensor, width: int) -> list[list[int]]:
    return [row[width:].tolist() for row in out]


class RowScript:
    """Scripted drafts for a batch: row r drafts its true continuation, wrong from slot ``errors[r][step]``.

    Rows are followed through the batch by wrapping ``DraftCache.select_rows`` (finished rows leave the batch).
    """

    def __init__(self, references: list[torch.Tensor], errors: list[list], monkeypatch) -> None:
        self.references = references  # each: the row's real tokens, prompt + plain continuation
        self.errors = errors
        self.live = list(range(len(references)))
        self.step = [0] * len(references)
        script = self
        original_select = DraftCache.select_rows

        def select_rows(cache, rows):
            script.live = [script.live[int(i)] for i in rows]
            return original_select(cache, rows)

        monkeypatch.setattr(DraftCache, "select_rows", select_rows)
        monkeypatch.setattr(DraftSession, "propose", lambda session, *a: script.propose(session, *a))

    def propose(self, session, anchor, anchor_position, context_taps, context_positions, num_drafts=None):
        block = session.block_size
        logits = torch.full((len(self.live), block - 1, VOCAB), -1.0, dtype=torch.float64)
        for i, row in enumerate(self.live):
            reference = self.references[row]
            pos = (int(anchor_position[i]) + 1 + torch.arange(block - 1)).clamp(max=reference.shape[0] - 1)
            truth = reference[pos].clone()
            schedule = self.errors[row]
            slot = schedule[self.step[row]] if self.step[row] < len(schedule) else None
            if slot is not None:
                truth[slot - 1] = (truth[slot - 1] + 1) % VOCAB
            self.step[row] += 1
            logits[i, torch.arange(block - 1), truth] = 1.0
        return logits[:, :num_drafts]


@pytest.mark.parametrize("block_size", [4, 8])
def test_every_row_equals_plain_generate_alone(family, block_size):
    target = make_target(family)
    drafter = make_drafter(target, block_size=block_size)
    rows = prompts()
    ids, mask = left_pad(rows)
    out = target.generate(ids, attention_mask=mask, max_new_tokens=21, do_sample=False, assistant_model=drafter)
    for i, row in enumerate(rows):
        alone = target.generate(row[None], max_new_tokens=21, do_sample=False)
        assert out[i, ids.shape[1] :].tolist() == alone[0, row.shape[0] :].tolist(), f"row {i}"
    stats = drafter.last_stats
    assert len(stats.rows) == len(rows)
    assert [r.new_tokens for r in stats.rows] == [21] * len(rows)
    assert sorted(stats.acceptance_lengths) == sorted(a for r in stats.rows for a in r.acceptance_lengths)


def test_batch_equals_plain_batched_generate(family):
    """The whole output tensor, padding included, is what plain batched generate returns."""
    target = make_target(family)
    drafter = make_drafter(target)
    ids, mask = left_pad(prompts(seed=5))
    plain = target.generate(ids, attention_mask=mask, max_new_tokens=13, do_sample=False)
    fast = target.generate(ids, attention_mask=mask, max_new_tokens=13, do_sample=False, assistant_model=drafter)
    assert torch.equal(plain, fast)


def test_scripted_acceptance_differs_per_row_and_eos_inside_a_block(family, monkeypatch):
    """Row 0 accepts every draft and hits EOS mid-block; row 1 rejects at chosen slots; row 2 runs to the end."""
    target = make_target(family)
    drafter = make_drafter(target, block_size=8)
    for seed in range(7, 40):  # prompts for which such an EOS exists (tiny random models repeat themselves)
        rows = prompts((5, 9, 2), seed=seed)
        references = [target.generate(r[None], max_new_tokens=28, do_sample=False)[0] for r in rows]
        continuation = references[0][rows[0].shape[0] :].tolist()
        others = {t for r, ref in zip(rows[1:], references[1:]) for t in ref[r.shape[0] :].tolist()}
        # EOS: a token that row 0 first writes inside its second block (tokens 10…16; the first 9 come from the
        # prefill and a fully accepted block) and the other rows never write.
        candidates = [k for k in range(9, 16) if continuation[k] not in continuation[:k] + list(others)]
        if candidates:
            break
    first_at = candidates[0]
    eos = continuation[first_at]
    ids, mask = left_pad(rows)
    plain_alone = [target.generate(r[None], max_new_tokens=28, do_sample=False, eos_token_id=eos)[0] for r in rows]
    assert len(plain_alone[0]) < len(references[0])  # EOS really stops row 0 early

    RowScript(references, [[None, None], [2, 5, 1, 3], [None, 1]], monkeypatch)
    out = target.generate(ids, attention_mask=mask, max_new_tokens=28, do_sample=False, eos_token_id=eos,
                          pad_token_id=0, assistant_model=drafter)
    for i, row in enumerate(rows):
        expected = plain_alone[i][row.shape[0] :].tolist()
        got = out[i, ids.shape[1] :].tolist()
        assert got[: len(expected)] == expected, f"row {i}"
        assert all(t == 0 for t in got[len(expected) :]), f"row {i} is padded after it stopped"
    per_row = [r.acceptance_lengths for r in drafter.last_stats.rows]
    assert per_row[0] == [8, 8]  # 1 + 8 tokens, then EOS inside the second (fully accepted) block
    assert drafter.last_stats.rows[0].new_tokens == first_at + 1
    assert per_row[1][:4] == [2, 5, 1, 3]
    assert per_row[2][:2] == [8, 1]
    assert [r.new_tokens for r in drafter.last_stats.rows] == [len(a) - len(r) for a, r in zip(plain_alone, rows)]


def test_cache_stays_bounded_when_rows_take_turns(monkeypatch):
    """Rows alternately accept everything and nothing: without compaction the cache would grow by a full block
    per step while each row commits about half of one."""
    target = make_target("qwen3")
    block = 8
    drafter = make_drafter(target, block_size=block)
    rows = prompts((4, 7), seed=9)
    ids, mask = left_pad(rows)
    new = 300
    references = [target.generate(r[None], max_new_tokens=new, do_sample=False)[0] for r in rows]
    RowScript(references, [[None, 1] * new, [1, None] * new], monkeypatch)
    out = target.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, assistant_model=drafter)
    for i, row in enumerate(rows):
        assert out[i, ids.shape[1] :].tolist() == references[i][row.shape[0] :].tolist()
    stats = drafter.last_stats
    steps = max(len(r.acceptance_lengths) for r in stats.rows)
    longest = ids.shape[1] + new
    without_compaction = ids.shape[1] + steps * block
    assert stats.peak_cache_slots <= longest * 4 // 3 + COMPACT_MIN_HOLES + block
    assert stats.peak_cache_slots < 0.8 * without_compaction
    # The draft cache is squeezed too: its final length is within the compaction slack of the longest context.
    assert stats.draft_cache_slots <= longest * 4 // 3 + COMPACT_MIN_HOLES + block


def test_draft_cache_compaction_keeps_each_rows_entries_in_order():
    cache = DraftCache()
    positions = torch.tensor([[-1, 0, 1, -1, 2, -1], [0, -1, 1, 2, 3, 4]])
    keys = torch.arange(2 * 6, dtype=torch.float32).view(2, 1, 6, 1)
    cache.keys, cache.values, cache.positions = [keys], [keys.clone() * 10], [positions]
    assert cache.padding_slots() == 1
    cache.compact()
    assert cache.positions[0].tolist() == [[-1, -1, 0, 1, 2], [0, 1, 2, 3, 4]]
    assert cache.keys[0][0, 0, 2:, 0].tolist() == [1.0, 2.0, 4.0]
    assert cache.keys[0][1, 0, :, 0].tolist() == [6.0, 8.0, 9.0, 10.0, 11.0]
    assert torch.equal(cache.values[0], cache.keys[0] * 10)


@pytest.mark.parametrize("mode", ["strict", "ratio"])
def test_sampled_row_does_not_depend_on_the_rest_of_the_batch(mode):
    """With keyed randomness a row's sample is a function of (seed, its positions): the same alone, and with any
    companions."""
    target = make_target("llama")
    drafter = make_drafter(target)
    drafter.sampling_mode = mode
    first, *others = prompts((6, 3, 9, 4), seed=11)
    kwargs = dict(max_new_tokens=16, do_sample=True, temperature=1.3, top_k=20, assistant_model=drafter)

    torch.manual_seed(123)
    alone = target.generate(first[None], **kwargs)[0, first.shape[0] :].tolist()
    results = []
    for companions in (others[:1], others[1:], others):
        ids, mask = left_pad([first, *companions])
        torch.manual_seed(123)
        results.append(target.generate(ids, attention_mask=mask, **kwargs)[0, ids.shape[1] :].tolist())
    assert all(r == alone for r in results)
    torch.manual_seed(124)
    ids, mask = left_pad([first, *others])
    assert target.generate(ids, attention_mask=mask, **kwargs)[0, ids.shape[1] :].tolist() != alone


class Collect(BaseStreamer):
    def put(self, value):
        pass

    def end(self):
        pass


@pytest.mark.parametrize(
    "extra, message",
    [
        (dict(streamer=Collect()), "streamer"),
        (dict(return_dict_in_generate=True, output_scores=True), "output_scores"),
    ],
)
def test_batched_options_that_cannot_work_are_refused(extra, message):
    target = make_target("qwen3")
    ids, mask = left_pad(prompts())
    with pytest.raises(ValueError, match=message):
        target.generate(ids, attention_mask=mask, max_new_tokens=4, assistant_model=make_drafter(target), **extra)


def test_right_padded_batch_is_refused():
    target = make_target("qwen3")
    ids, mask = left_pad(prompts())
    with pytest.raises(ValueError, match="left padding"):
        target.generate(ids, attention_mask=mask.flip(1), max_new_tokens=4, assistant_model=make_drafter(target))


def test_interrupted_batch_leaves_the_target_clean():
    """An exception from a logits processor mid-batch: no hooks left behind, and plain generate afterwards is
    unaffected."""
    from transformers import LogitsProcessor, LogitsProcessorList

    from dflash_hf.core.pair_dflash import target_decoder_layers

    class FailLate(LogitsProcessor):
        calls = 0

        def __call__(self, input_ids, scores):
            FailLate.calls += 1
            if FailLate.calls > 12:
                raise KeyboardInterrupt
            return scores

    target = make_target("qwen3")
    ids, mask = left_pad(prompts())
    before = target.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    with pytest.raises(KeyboardInterrupt):
        target.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False, assistant_model=make_drafter(target),
                        logits_processor=LogitsProcessorList([FailLate()]))
    assert FailLate.calls > 12
    assert all(not layer._forward_hooks for layer in target_decoder_layers(target))
    assert torch.equal(target.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False), before)


class StopRowAfter(StoppingCriteria):
    """A custom criterion without ``eos_token_id``: the row whose padded prompt is a key of ``stops`` stops once it
    has that many new tokens. It reads only the rows it is given, so it works on any batch (plain generate passes
    the whole batch, DFlash one row at a time)."""

    def __init__(self, prompt_width: int, stops: dict[tuple[int, ...], int]) -> None:
        self.prompt_width = prompt_width
        self.stops = stops

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        new_tokens = input_ids.shape[1] - self.prompt_width
        wanted = [self.stops.get(tuple(row[: self.prompt_width].tolist())) for row in input_ids]
        return torch.tensor([n is not None and new_tokens >= n for n in wanted], device=input_ids.device)


@pytest.mark.parametrize(
    "stops, max_new_tokens, extra",
    [
        ((3, 10, None), 17, {}),  # the last row runs to max_new_tokens
        ((7, 2, 12), 30, {}),  # every row stops by its criterion: the batch ends at the latest stop
        ((5, 11, 1), 20, {"pad_token_id": 0}),  # a pad token alone does not make generate pad (no EOS criterion)
    ],
)
def test_rows_stopped_without_eos_keep_writing_like_plain_batched_generate(family, stops, max_new_tokens, extra):
    """transformers pads a finished row only when an EOS criterion exists; with a custom criterion alone plain
    batched generate keeps writing stopped rows until every row has stopped, and so must DFlash."""
    target = make_target(family)
    drafter = make_drafter(target, block_size=4)
    rows = prompts((5, 9, 2), seed=21)
    ids, mask = left_pad(rows)
    stop_after = {tuple(padded.tolist()): n for padded, n in zip(ids, stops) if n is not None}
    kwargs = dict(attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, **extra)
    plain = target.generate(ids, stopping_criteria=StoppingCriteriaList([StopRowAfter(ids.shape[1], stop_after)]),
                            **kwargs)
    fast = target.generate(ids, stopping_criteria=StoppingCriteriaList([StopRowAfter(ids.shape[1], stop_after)]),
                           assistant_model=drafter, **kwargs)
    assert plain.shape[1] - ids.shape[1] == max(n or max_new_tokens for n in stops)
    assert fast.tolist() == plain.tolist()
    stats = drafter.last_stats
    assert [r.new_tokens for r in stats.rows] == [plain.shape[1] - ids.shape[1]] * len(rows)
    assert stats.new_tokens == sum(r.new_tokens for r in stats.rows)


def test_static_cache_batch_stats_are_plain_python_numbers():
    """Every stats field is a plain Python value (not a tensor), so ``as_dict()`` goes through json.dumps. Where
    the release's static cache cannot drop positions, DFlash refuses it, saying what to do."""
    from transformers.cache_utils import StaticLayer

    target = make_target("qwen3")
    drafter = make_drafter(target)
    ids, mask = left_pad(prompts())
    if not hasattr(StaticLayer, "crop"):  # transformers 5.15
        with pytest.raises(ValueError, match="cannot drop positions.*drop cache_implementation"):
            target.generate(ids, attention_mask=mask, max_new_tokens=9, do_sample=False,
                            cache_implementation="static", assistant_model=drafter)
        return
    target.generate(ids, attention_mask=mask, max_new_tokens=9, do_sample=False, cache_implementation="static",
                    assistant_model=drafter)
    stats = drafter.last_stats
    for one in (stats, *stats.rows):
        for name, value in one.as_dict().items():
            if name != "rows":
                values = value if isinstance(value, list) else [value]
                assert all(type(v) in (int, float, str) for v in values), f"{name} = {value!r}"
    assert stats.peak_cache_slots > 0
    assert json.loads(json.dumps(stats.as_dict()))["peak_cache_slots"] == stats.peak_cache_slots

"""The DFlash decode loop behind ``target.generate(..., assistant_model=drafter)``, for one prompt or a batch.

Portable core: imports only torch, transformers and sibling modules; copied into every published drafter.

One verify step, with ``start`` = tokens the target has processed (its cache length):
1. the token at ``start`` (committed last step, not yet processed) opens the block ``[token, MASK × (B-1)]``;
2. ONE drafter forward drafts the B-1 masked slots, attending to the context features of every committed position
   (a persistent draft cache holds them; the block's own entries are never kept);
3. ONE target forward over ``[token, drafts]`` verifies them while forward hooks capture the tapped layers; the
   accepted drafts plus one target token are committed and the target cache is cropped to the committed length.
   The taps of the committed positions are the next step's new context: no extra target pass.

Elsewhere: ``verify_dflash`` (acceptance), ``cache_dflash`` (draft cache, target-cache surgery), ``matmul_dflash``
(CPU few-row products), ``patch_dflash`` (dispatch), ``pair_dflash`` (pair checks, options, taps), ``draft_dflash``
(drafting), ``schedule_dflash`` (drafts per step), ``lookup_dflash`` (prompt lookup). This module holds the loop and
re-exports the names of ``pair_dflash`` and ``draft_dflash``, which were defined here before.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.utils import logging

from .cache_dflash import (
    LinearStateSnapshot,
    activate_past_recording,
    compact_if_wasteful,
    crop_cache,
    has_linear_attention,
    keep_draft_context,
    left_aligned_mask,
    prompt_tokens_in_cache,
    ragged_batch_problem,
    resume_draft_context,
    select_cache_rows,
    uncroppable_cache_problem,
)
from .draft_dflash import DraftSession, draft_block
from .lookup_dflash import lookup_for_call
from .matmul_dflash import few_row_products, routed_linears
from .pair_dflash import (
    DFlashOptions,
    TapRecorder,
    draft_schedule,
    target_decoder_layers,
    target_text_config,
    validate_pair,
)
from .schedule_dflash import PROBE_EVERY
from .transformers_compat import cache_from_model_kwargs, forward_cache_kwarg, make_generate_output
from .verify_dflash import BatchProcessorView, BlockVerifier

logger = logging.get_logger(__name__)


@dataclass
class DFlashStats:
    """Statistics of one generate call (``drafter.last_stats``).

    ``acceptance_lengths`` has one entry per verify step: drafts accepted + 1 (the target's own token); a step that
    drafted nothing (see ``drafts_per_step``) counts 1.
    ``draft_time_s`` / ``verify_time_s`` are host wall times; on CUDA the draft time excludes GPU work still
    queued when verification starts (the acceptance decision synchronises once per step).
    """

    acceptance_lengths: list[int] = field(default_factory=list)
    num_target_forwards: int = 0
    new_tokens: int = 0
    draft_time_s: float = 0.0
    verify_time_s: float = 0.0
    prefill_time_s: float = 0.0
    verify_backend: str = "torch"
    sampling: str = "greedy"
    block_size: int = 0
    draft_cache_bytes: int = 0
    # Hybrid targets: forwards that re-ran the accepted prefix after restoring linear-attention states.
    num_rollback_forwards: int = 0
    rollback_time_s: float = 0.0
    # Batched generate: one DFlashStats per row (its acceptance lengths and tokens), and the largest target cache
    # (in slots, holes included) the batch reached.
    rows: list = field(default_factory=list)
    peak_cache_slots: int = 0
    draft_cache_slots: int = 0
    # Drafts each step verified (0: a plain step, which commits one token): the fixed number, or what
    # num_speculative_tokens = "auto" chose; fewer near max_length.
    drafts_per_step: list[int] = field(default_factory=list)
    # Prompt lookup: row-steps that verified an n-gram instead of the drafter's block; steps with no drafter forward.
    lookup_proposals: int = 0
    drafter_forwards_skipped: int = 0

    @property
    def mean_acceptance_length(self) -> float:
        return sum(self.acceptance_lengths) / len(self.acceptance_lengths) if self.acceptance_lengths else 0.0

    @property
    def num_verify_steps(self) -> int:
        return len(self.acceptance_lengths)

    def as_dict(self) -> dict:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["rows"] = [row.as_dict() for row in self.rows]
        out["mean_acceptance_length"] = self.mean_acceptance_length
        return out


# ------------------------------------------------------------------------------------------------------------------
# The decode loop (the default path of generate with a DFlash assistant)
# ------------------------------------------------------------------------------------------------------------------
def _check_request(
    target: nn.Module, generation_config: Any, input_ids: torch.Tensor, synced_gpus: bool, model_kwargs: dict
) -> None:
    if model_kwargs.get("inputs_embeds") is not None:
        raise ValueError(
            "generate(inputs_embeds=...) is not supported with a DFlash assistant: the drafter opens each block "
            "with a token id, and the target verifies token ids. Pass input_ids (and attention_mask) instead, or "
            "drop assistant_model."
        )
    if input_ids.shape[1] == 0:
        raise ValueError("The prompt is empty: DFlash needs at least one prompt token (e.g. the BOS token).")
    context = getattr(target_text_config(target), "max_position_embeddings", None)
    if context is not None and input_ids.shape[1] >= context:
        raise ValueError(
            f"The prompt has {input_ids.shape[1]} tokens but the target's context is {context} positions "
            "(max_position_embeddings); shorten the prompt."
        )
    if context is not None and generation_config.max_length > context:
        raise ValueError(
            f"Generating up to {generation_config.max_length} tokens (prompt + max_new_tokens) would overflow the "
            f"target's context, max_position_embeddings={context}; lower max_new_tokens to at most "
            f"{context - input_ids.shape[1]}."
        )
    if generation_config.num_return_sequences > 1:
        raise ValueError(
            "num_return_sequences > 1 is not supported with a DFlash assistant; call generate several times with "
            "do_sample=True instead."
        )
    if generation_config.return_dict_in_generate and (
        generation_config.output_attentions or generation_config.output_hidden_states
    ):
        raise ValueError(
            "output_attentions / output_hidden_states are not supported with a DFlash assistant (the target "
            "processes blocks, not single tokens). Request output_scores or output_logits, or drop the assistant."
        )
    if synced_gpus:
        raise ValueError("synced_gpus (FSDP/ZeRO-3 generation) is not supported with a DFlash assistant.")


def _prompt_positions(model_kwargs: dict, mask: torch.Tensor) -> torch.Tensor:
    """The prompt's RoPE positions [R, P] as generate prepared them (``position_ids``: the attention mask's running
    count, 0 on masked slots), else derived from ``mask`` the same way. generate puts each new token one past the
    prompt's last position, so a single prompt that ends in masked pad tokens continues from 1: so does DFlash."""
    given = model_kwargs.get("position_ids")
    if given is not None and given.shape == mask.shape:
        return given.to(device=mask.device, dtype=torch.long)
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def _batch_problem(num_rows: int, streamer: Any, want_outputs: bool, cache: Any) -> str | None:
    """Why a batch of ``num_rows`` cannot run here (None when it can): the one-row features."""
    if num_rows == 1:
        return None
    if streamer is not None:
        return "a streamer takes one sequence; stream one prompt per generate call"
    if want_outputs:
        return "output_scores / output_logits are per step, and rows of a DFlash batch advance by different amounts"
    return ragged_batch_problem(cache)


# How a batch shares one target cache. All rows run one verify forward per step over n+1 slots, but each row
# accepts its own count: a row's rejected slots stay in place as holes hidden by the 2-D attention mask (exactly
# like left padding), and every row carries its own RoPE positions. Slots rejected by every row are cropped at
# once, so with one row nothing is ever left as a hole. When holes pile up, each row's live slots are gathered to
# the right (keys hold their RoPE, so moving them changes nothing); the draft cache is squeezed the same way.
# Finished rows leave the batch.
@dataclass
class DecodeState:
    """Where decoding stands. Batch tensors are indexed by live row i; ``live[i]`` is its row in the batch (a
    Python list: the loop reads it per row and per token, and a device tensor would sync on every read).

    sequences: [N, max_length] token buffer, allocated once; ``lengths[b]`` of row b are real (left padding
        included), the rest is filled with the pad token when the output is assembled.
    real_len: [R] the pending token's position (real tokens committed before it);
    padding: [R] the row's length (pending token included) - real_len - 1: its left padding (for one prompt that
        ends in masked pads, which generate continues from position 1, all of the prompt but one slot);
    mask: [R, S] attention mask over the target cache's slots, or None for one row without padding (no holes can
        ever appear then);
    context / context_positions: [R, C, K*H] / [R, C] taps of committed positions the drafter has not seen yet
        (-1 positions: holes and padding); next_token: [R] the pending token, committed but not yet processed.
    """

    sequences: torch.Tensor
    lengths: list[int]
    live: list[int]
    real_len: torch.Tensor
    padding: torch.Tensor
    mask: torch.Tensor | None
    context: torch.Tensor
    context_positions: torch.Tensor
    next_token: torch.Tensor
    finished: list[bool] = field(default_factory=list)
    # Batches without an EOS criterion (see ``pads_finished_rows``): the length at which each row's criteria fired
    # (None while running); such a row keeps writing, as in plain generate, until the batch's last row stops.
    stopped_at: list[int | None] = field(default_factory=list)
    limit: int = 0  # no row is written past this length: max_length, then the batch's end once every row stopped

    def row_ids(self, row: int) -> torch.Tensor:
        """Row ``row``'s sequence so far, [1, L]: what plain generate's criteria and processors see."""
        return self.sequences[row : row + 1, : self.lengths[row]]

    def all_rows(self) -> list[torch.Tensor]:
        return [self.sequences[b, : self.lengths[b]] for b in range(self.sequences.shape[0])]

    def keep_rows(self, keep: torch.Tensor) -> None:
        """Keep live rows ``keep`` (indices into the live rows) of every per-row tensor."""
        self.live = [self.live[i] for i in keep.tolist()]
        self.real_len, self.padding = self.real_len[keep], self.padding[keep]
        self.next_token, self.context = self.next_token[keep], self.context[keep]
        self.context_positions = self.context_positions[keep]
        if self.mask is not None:
            self.mask = self.mask[keep]


def pads_finished_rows(stopping_criteria: Any) -> bool:
    """transformers' rule for a batch: a row whose criteria fire gets pad tokens from then on only when some
    criterion has an ``eos_token_id``; without one, plain generate keeps writing that row's own tokens until every
    row has stopped (the same rule in every release we support)."""
    return any(hasattr(criterion, "eos_token_id") for criterion in stopping_criteria)


def _end_batch_once_all_stopped(state: DecodeState) -> None:
    """Rows that stopped without padding run on to the batch's end, the latest stop: once every row has stopped,
    that end is known, and each row that reached it is finished."""
    if any(at is None for at in state.stopped_at):
        return
    state.limit = min(state.limit, max(state.stopped_at))
    for row, length in enumerate(state.lengths):
        state.finished[row] = length >= state.limit


def run_dflash_decoding(
    target: nn.Module,
    drafter: nn.Module,
    input_ids: torch.LongTensor,
    logits_processor: Any,
    stopping_criteria: Any,
    generation_config: Any,
    synced_gpus: bool = False,
    streamer: Any = None,
    **model_kwargs: Any,
) -> Any:
    """DFlash decoding of one prompt or a left-padded batch, with the arguments generate hands to
    ``_assisted_decoding``. Every row equals plain ``generate`` on that prompt alone."""
    for key in ("inputs_tensor", "assistant_model", "assistant_tokenizer", "tokenizer"):
        model_kwargs.pop(key, None)
    _check_request(target, generation_config, input_ids, synced_gpus, model_kwargs)
    validate_pair(target, drafter)
    options = DFlashOptions.from_drafter(drafter)
    cache = cache_from_model_kwargs(model_kwargs)
    if cache is None:
        raise RuntimeError("generate did not prepare a KV cache; DFlash needs use_cache=True.")
    problem = uncroppable_cache_problem(cache)
    if problem:
        raise ValueError(f"This {type(cache).__name__} cannot be used with a DFlash assistant: {problem}.")
    num_rows, device = input_ids.shape[0], input_ids.device
    want_scores = bool(generation_config.return_dict_in_generate and generation_config.output_scores)
    want_logits = bool(generation_config.return_dict_in_generate and generation_config.output_logits)
    problem = _batch_problem(num_rows, streamer, want_scores or want_logits, cache)
    if problem:
        raise ValueError(
            f"Batched DFlash generation (batch of {num_rows}) is not available here: {problem}. Call generate "
            "once per prompt (batch size 1 supports it), or drop `assistant_model`."
        )
    mask = model_kwargs.get("attention_mask")
    mask = torch.ones_like(input_ids) if mask is None else mask.to(device=device, dtype=torch.long)
    if num_rows > 1 and bool((mask[:, -1] == 0).any()):  # one row: plain masks trailing pads, so do we
        raise ValueError(
            "The batch is right-padded; DFlash (like generate) needs left padding. Set "
            "tokenizer.padding_side = 'left' before tokenizing the prompts."
        )
    pad_token = generation_config._pad_token_tensor
    if pad_token is None and generation_config._eos_token_tensor is not None:
        pad_token = generation_config._eos_token_tensor.view(-1)[0]

    cached = prompt_tokens_in_cache(cache, input_ids)
    activate_past_recording(cache)
    snapshot = LinearStateSnapshot(cache) if has_linear_attention(cache) else None  # one row only (checked above)
    cache_kwarg = forward_cache_kwarg(target)
    verifier = BlockVerifier(bool(generation_config.do_sample), options.sampling_mode, device)
    processors = BatchProcessorView(logits_processor, num_rows, pad_token)
    session = DraftSession(target, drafter, options)
    schedule = draft_schedule(drafter, options)
    chooser = lookup_for_call(drafter, options, generation_config, schedule)  # None: no prompt lookup
    stats = DFlashStats(sampling=verifier.mode, block_size=session.block_size, verify_backend=verifier.backend)
    if num_rows > 1:
        stats.rows = [DFlashStats(sampling=verifier.mode, block_size=session.block_size,
                                  verify_backend=verifier.backend) for _ in range(num_rows)]
    drafter.last_stats = stats
    scores_out: list[torch.Tensor] = []
    logits_out: list[torch.Tensor] = []

    sequences = input_ids.new_zeros(num_rows, max(generation_config.max_length, input_ids.shape[1]))
    sequences[:, : input_ids.shape[1]] = input_ids
    positions = _prompt_positions(model_kwargs, mask)  # [R, P]
    real_len = positions[:, -1] + 1
    prompt_positions = positions.masked_fill(mask == 0, -1)[:, cached:]  # [R, P]: -1 on padding
    state = DecodeState(
        sequences=sequences, lengths=[input_ids.shape[1]] * num_rows, live=list(range(num_rows)),
        real_len=real_len, padding=input_ids.shape[1] - real_len,
        mask=None if num_rows == 1 and bool(mask.all()) else mask,
        context=input_ids.new_empty(0), context_positions=prompt_positions, next_token=input_ids[:, -1],
        finished=[False] * num_rows, stopped_at=[None] * num_rows, limit=generation_config.max_length,
    )
    # One row always ends at its stop; a batch pads the rows that stop first only under transformers' rule.
    pad_stopped_rows = num_rows == 1 or pads_finished_rows(stopping_criteria)

    def forward(tokens: torch.Tensor, token_positions: torch.Tensor, prefill: bool) -> torch.Tensor:
        """One target forward over tokens [R, T] at positions [R, T] on the cache; prefill keeps the last logits."""
        kwargs = {cache_kwarg: cache, "use_cache": True, "attention_mask": state.mask,
                  "position_ids": token_positions.clamp(min=0)}
        if prefill and target._supports_logits_to_keep():
            kwargs["logits_to_keep"] = 1
        stats.num_target_forwards += 1
        for r in state.live if stats.rows else ():
            stats.rows[r].num_target_forwards += 1
        with few_row_products(device, False if prefill else options.few_row_matmul_on_cpu):
            return target(input_ids=tokens, **kwargs).logits

    def commit(i: int, tokens: torch.Tensor, step_scores: torch.Tensor, step_logits: torch.Tensor) -> bool:
        """Append live row i's tokens [k] one at a time, exactly as plain generate would, checking its stopping
        criteria after each; True once one fires (the rest of ``tokens`` is dropped). A batch row that stops
        without padding (``pad_stopped_rows`` false) keeps all its tokens and is finished by
        ``_end_batch_once_all_stopped``."""
        row = state.live[i]
        start = state.lengths[row]
        tokens = tokens[: max(state.limit - start, 0)]
        state.sequences[row, start : start + tokens.shape[0]] = tokens  # past ``lengths`` nothing is visible
        for t in range(tokens.shape[0]):
            state.lengths[row] = start + t + 1
            stats.new_tokens += 1
            if stats.rows:
                stats.rows[row].new_tokens += 1
            if want_scores:
                scores_out.append(step_scores[None, t])
            if want_logits:  # float32, as plain generate returns them whatever the model's dtype
                logits_out.append(step_logits[None, t].float())
            if state.stopped_at[row] is not None:
                continue
            if bool(stopping_criteria(state.row_ids(row), step_scores[None, t]).any()):
                if not pad_stopped_rows:
                    state.stopped_at[row] = state.lengths[row]
                    continue
                if streamer is not None:  # [1, k], one row as transformers' loops pass it
                    streamer.put(tokens[None, : t + 1].cpu())
                return True
        if streamer is not None:
            streamer.put(tokens[None].cpu())
        return state.stopped_at[row] is not None and state.lengths[row] >= state.limit  # ran on to the end

    with TapRecorder(target, drafter.config.target_layer_ids, session.device) as taps, torch.no_grad(), \
            routed_linears(target, device, options.few_row_matmul_on_cpu):
        # Prefill: only the prompt tokens the cache does not hold yet (all of them unless it came filled).
        t0 = time.perf_counter()
        logits = forward(input_ids[:, cached:], prompt_positions, prefill=True)[:, -1:]  # [R, 1, V]
        state.context = taps.take()  # [R, P, K*H]
        if cached:
            resumed, state.context, state.context_positions = resume_draft_context(
                cache, drafter, cached, state.context, state.context_positions
            )
            session.cache = resumed if resumed is not None else session.cache
        no_drafts = input_ids[:, :0]
        scores = processors.block_scores(logits, state.live, state.all_rows() if processors else [], no_drafts)
        _, state.next_token = verifier.verify(scores, no_drafts, torch.zeros_like(real_len), real_len)
        stats.prefill_time_s = time.perf_counter() - t0
        state.finished = [commit(i, state.next_token[i : i + 1], scores[i], logits[i]) for i in range(num_rows)]
        if not pad_stopped_rows:
            _end_batch_once_all_stopped(state)
        peak_slots = int(cache.get_seq_length())

        while True:
            # 1. Finished rows leave the batch and stop costing work.
            keep = [i for i, row in enumerate(state.live) if not state.finished[row]]
            if not keep:
                break
            if len(keep) < len(state.live):
                keep = torch.tensor(keep, device=device)
                state.keep_rows(keep)
                select_cache_rows(cache, keep)
                session.cache.select_rows(keep.to(session.device))
            rows = state.live

            # 2. Draft: never past max_length, so a row near its end verifies fewer drafts (its extra slots are holes).
            t0 = time.perf_counter()
            cur_len = state.padding + state.real_len + 1  # each row's sequence length, its pending token included
            wanted = session.max_drafts if schedule is None else schedule.drafts(len(rows))
            if schedule is not None and schedule.plain_expected_faster:
                logger.warning_once(
                    "DFlash: at the acceptance seen so far, drafting is expected to be slower than plain decoding "
                    f"on this machine; decoding plainly, drafting one step in {PROBE_EVERY} to check again. Set "
                    "drafter.num_speculative_tokens to a number to draft every step."
                )
            room = (state.limit - cur_len - 1).clamp(min=0)  # drafts each row may verify before its limit
            num_drafts = room.clamp(max=wanted)
            proposals = None
            if chooser is not None:
                starts = state.padding.tolist()  # a row's left padding is not text to look up
                texts = [state.sequences[r, starts[i] : state.lengths[r]] for i, r in enumerate(rows)]
                proposals = chooser.propose(texts, room.tolist(), wanted)
                if not proposals.run_drafter:
                    num_drafts = torch.zeros_like(num_drafts)
            draft_scores, unseen = None, None
            drafter_width = int(num_drafts.max())
            if drafter_width == 0:  # no drafter forward: it reads the context it missed at its next draft
                drafts = state.next_token.new_empty(len(rows), 0)
                unseen = (state.context, state.context_positions)
            else:
                draft_logits = session.propose(state.next_token, state.real_len.to(session.device), state.context,
                                               state.context_positions, drafter_width).to(device)  # [R, n, V]
                if verifier.samples_drafts:
                    drafts, draft_scores = processors.sampled_drafts(
                        draft_logits, rows, state.all_rows(),
                        lambda q, t: verifier.sample_drafts(q, state.real_len + 1 + t),
                    )
                else:
                    drafts = draft_logits.argmax(dim=-1)  # [R, n]
            drafter_counts = num_drafts  # [R] drafts of the drafter's own each row verifies
            if proposals is not None and any(proposals.lookup):
                drafts, num_drafts = proposals.merged(drafts, num_drafts, state.next_token)
                drafter_counts = num_drafts.masked_fill(torch.tensor(proposals.lookup, device=device), 0)
                stats.lookup_proposals += sum(proposals.lookup)
                stats.drafter_forwards_skipped += drafter_width == 0
            width = int(num_drafts.max())
            drafts = drafts[:, :width]
            stats.drafts_per_step.append(width)
            t1 = time.perf_counter()
            stats.draft_time_s += t1 - t0

            # 3. Verify: one target forward over [pending token, drafts] per row, taps recorded.
            block = torch.cat((state.next_token[:, None], drafts), dim=1)  # [R, n+1]
            block_positions = state.real_len[:, None] + torch.arange(width + 1, device=device)
            if state.mask is not None:
                state.mask = torch.cat((state.mask, state.mask.new_ones(len(rows), width + 1)), dim=1)
            if snapshot is not None:
                snapshot.take()
            logits = forward(block, block_positions, prefill=False)  # [R, n+1, V]
            peak_slots = max(peak_slots, int(cache.get_seq_length()))
            scores = processors.block_scores(logits, rows, state.all_rows() if processors else [], drafts)
            accepted, next_token = verifier.verify(scores, drafts, num_drafts, state.real_len + 1, draft_scores)

            # 4. Accept: row i keeps slots 0…accepted[i]; slots no row kept are cropped, the rest become holes.
            counts = accepted.tolist()  # the step's one host sync: how far each row got
            most = max(counts)
            kept = None  # one row: everything it rejected is cropped, so what is left is all kept
            if num_rows > 1:
                kept = torch.arange(width + 1, device=device)[None, :] <= accepted[:, None]  # [R, n+1]
            if state.mask is not None:
                state.mask[:, -(width + 1) :] = 1 if kept is None else kept.long()
                state.mask = state.mask[:, : state.mask.shape[1] - (width - most)]
            state.context = taps.take()[:, : most + 1]  # the accepted prefix is the drafter's next context
            if snapshot is not None and most < width:
                # Linear-attention states absorbed the rejected drafts and cannot be cropped: restore the states
                # from before the block and advance them over the accepted prefix only.
                t2 = time.perf_counter()
                snapshot.restore(width + 1)
                forward(block[:, : most + 1], block_positions[:, : most + 1], prefill=False)
                taps.take()  # identical to the verify forward's taps of these positions
                stats.num_rollback_forwards += 1
                stats.rollback_time_s += time.perf_counter() - t2
            else:
                crop_cache(cache, width - most)
            state.context_positions = block_positions[:, : most + 1]
            if kept is not None:  # holes are not context
                state.context_positions = state.context_positions.masked_fill(~kept[:, : most + 1], -1)
            if unseen is not None:
                state.context = torch.cat((unseen[0], state.context), dim=1)
                state.context_positions = torch.cat((unseen[1], state.context_positions), dim=1)
            state.real_len = state.real_len + accepted + 1
            state.next_token = next_token

            # 5. Commit each row's accepted drafts and the target's next token, token by token.
            for i, row in enumerate(rows):
                a = counts[i]
                stats.acceptance_lengths.append(a + 1)
                if stats.rows:
                    stats.rows[row].acceptance_lengths.append(a + 1)
                committed = torch.cat((drafts[i, :a], next_token[i : i + 1]))
                state.finished[row] = commit(i, committed, scores[i], logits[i])
            if not pad_stopped_rows:
                _end_batch_once_all_stopped(state)

            # 6. One row: a stop inside the block leaves processed tokens past the end of the sequence; drop them so
            #    the cache it returns holds what plain generate's does. A batch: squeeze holes once worth a gather.
            if num_rows == 1:
                surplus = cache.get_seq_length() - (state.lengths[0] - 1)
                if state.finished[0] and surplus > 0:
                    if state.mask is not None:
                        state.mask = state.mask[:, :-surplus]
                    _drop_surplus(cache, snapshot, surplus, most, block, block_positions, forward, taps, stats)
                    state.context = state.context[:, : state.context.shape[1] - surplus]
                    state.context_positions = state.context_positions[:, : state.context_positions.shape[1] - surplus]
            elif compact_if_wasteful(cache, state.mask, session.cache):
                state.mask = left_aligned_mask(state.mask)
            stats.verify_time_s += time.perf_counter() - t1
            drafted = None if proposals is None else drafter_counts.tolist()  # one host read for both
            if schedule is not None:
                schedule.observe(width, counts, t1 - t0, time.perf_counter() - t1, drafted=drafted)
            if proposals is not None:
                chooser.observe(proposals, counts, drafted)

        stats.draft_cache_bytes = int(session.cache.nbytes())
        if num_rows > 1:
            stats.draft_cache_slots = int(session.cache.length())
            stats.peak_cache_slots = peak_slots

    if streamer is not None:
        streamer.end()
    if num_rows > 1:
        if not pad_stopped_rows:
            _trim_to_batch_end(state, stats)
        output = _assemble_batch(state, pad_token)
        report_finished_call(drafter, output, mask, stats, generation_config)
        # Finished rows left the cache: it no longer matches the batch, so none is returned.
        return make_generate_output(output, None) if generation_config.return_dict_in_generate else output
    keep_draft_context(cache, drafter, session.cache, state.context, state.context_positions)
    output = state.row_ids(0).clone()  # not a view that would keep the whole buffer alive
    report_finished_call(drafter, output, mask, stats, generation_config)
    if not generation_config.return_dict_in_generate:
        return output
    return make_generate_output(
        output, cache, scores=tuple(scores_out) if want_scores else None,
        logits=tuple(logits_out) if want_logits else None,
    )


def report_finished_call(drafter: nn.Module, sequences: torch.Tensor, attention_mask: torch.Tensor,
                         stats: DFlashStats, generation_config: Any) -> None:
    """Hand a call that is about to return normally to ``drafter.traffic_recorder``, when one is set (by
    ``dflash_hf.record_traffic``; any object with this ``record_call`` works): the returned sequences [N, L], the
    prompt's attention mask [N, P] (the prompt is ``sequences[:, :P]``), one DFlashStats per row, the config."""
    recorder = getattr(drafter, "traffic_recorder", None)
    if recorder is not None:
        recorder.record_call(sequences, attention_mask, stats.rows or [stats], generation_config)


def _drop_surplus(cache: Any, snapshot: Any, surplus: int, accepted: int, block: torch.Tensor,
                  block_positions: torch.Tensor, forward: Any, taps: "TapRecorder", stats: DFlashStats) -> None:
    """Remove the last ``surplus`` of the ``accepted + 1`` positions the last verify step left in the cache."""
    if snapshot is None:
        crop_cache(cache, surplus)
        return
    kept = accepted + 1 - surplus
    snapshot.restore(accepted + 1)  # back to before the block, then forward over the kept tokens only
    forward(block[:, :kept], block_positions[:, :kept], prefill=False)
    taps.take()
    stats.num_rollback_forwards += 1


def _trim_to_batch_end(state: DecodeState, stats: DFlashStats) -> None:
    """Drop the tokens rows that ran on after their stop wrote past the batch's end (their last block may overshoot
    it before the last row stopped), from the sequences and from the counts."""
    for row, length in enumerate(state.lengths):
        extra = length - state.limit
        if extra > 0:
            state.lengths[row] = state.limit
            stats.new_tokens -= extra
            stats.rows[row].new_tokens -= extra


def _assemble_batch(state: DecodeState, pad_token: Any) -> torch.Tensor:
    """The batch output: rows that stopped early are right-padded with the pad token, as plain generate does."""
    longest = max(state.lengths)
    if any(length < longest for length in state.lengths) and pad_token is None:
        raise ValueError(
            "Rows of the batch stopped at different lengths and the generation config has neither pad_token_id "
            "nor eos_token_id to fill them; set generation_config.pad_token_id."
        )
    output = state.sequences[:, :longest].clone()
    for row, length in enumerate(state.lengths):
        if length < longest:
            output[row, length:] = int(pad_token)
    return output


__all__ = [
    "DFlashOptions",
    "DFlashStats",
    "DecodeState",
    "DraftSession",
    "TapRecorder",
    "draft_block",
    "report_finished_call",
    "run_dflash_decoding",
    "target_decoder_layers",
    "target_text_config",
    "validate_pair",
]

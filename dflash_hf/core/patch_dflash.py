"""The zero-flag dispatch: ``generate(assistant_model=<DFlash drafter>)`` runs DFlash, and DFlash's drafting as a
transformers ``CandidateGenerator`` for transformers' own assisted loop.

Portable core: imports only torch, transformers and sibling modules; copied into every published drafter.

``install_generate_patch`` wraps three private ``GenerationMixin`` methods; each wrapper acts only when the
assistant carries the duck-typed ``is_dflash_drafter`` marker and otherwise calls the original, so plain generate
and every other assistant run transformers' code untouched. The private signatures it relies on are listed in
``transformers_compat.PATCHED_SIGNATURES`` and checked by a test on every supported release.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import torch
from torch import nn
from transformers.generation.candidate_generator import CandidateGenerator
from transformers.generation.utils import GenerationMixin
from transformers.utils import logging

from .draft_dflash import DraftSession
from .generation_dflash import DFlashStats, report_finished_call
from .pair_dflash import DFlashOptions, TapRecorder, validate_pair
from .transformers_compat import (
    assistant_from_validate_args,
    cache_from_model_kwargs,
    generation_config_from_validate_args,
    stateful_check_lifted,
    stock_loop_refuses_stateful,
)

logger = logging.get_logger(__name__)


def is_dflash_drafter(model: Any) -> bool:
    return bool(getattr(model, "is_dflash_drafter", False)) and callable(getattr(model, "_dflash_decode", None))


def _looks_like_untrusted_dflash_checkpoint(model: Any) -> bool:
    config = getattr(model, "config", None)
    return config is not None and isinstance(getattr(config, "dflash_config", None), dict) and not is_dflash_drafter(model)


# ------------------------------------------------------------------------------------------------------------------
# The drafting unit for transformers' stock assisted loop
# ------------------------------------------------------------------------------------------------------------------
class DFlashCandidateGenerator(CandidateGenerator):
    """DFlash drafting as a transformers ``CandidateGenerator``.

    Works inside the stock ``_assisted_decoding`` loop of every supported release: it taps the target with its
    own forward hooks (no ``model_outputs`` protocol needed) and infers how many drafts the target accepted from
    how much ``input_ids`` grew. Greedy drafts with no candidate logits make the stock loop verify greedily, or
    with strict sampling when ``do_sample`` is set. Call ``close()`` (the generate patch does) to remove hooks.
    """

    requires_model_outputs = False

    def __init__(self, target: nn.Module, drafter: nn.Module, generation_config: Any = None) -> None:
        validate_pair(target, drafter)
        self.target = target
        self.drafter = drafter
        self.session = DraftSession(target, drafter)
        self.taps = TapRecorder(target, drafter.config.target_layer_ids, self.session.device).__enter__()
        self.max_length = getattr(generation_config, "max_length", None)
        self.context_len = 0  # positions already in the draft cache
        self.last_forward_start: int | None = None  # position of the first token of the last target forward
        self.stats = DFlashStats(sampling="strict" if getattr(generation_config, "do_sample", False) else "greedy")
        self.stats.block_size = drafter.config.block_size
        drafter.last_stats = self.stats

    @torch.no_grad()
    def get_candidates(self, input_ids: torch.LongTensor, **kwargs: Any) -> tuple[torch.LongTensor, None]:
        cur_len = input_ids.shape[1]
        if self.last_forward_start is None:  # the target has not run yet: let its prefill produce the context
            self.last_forward_start = 0
            return input_ids, None
        t0 = time.perf_counter()
        captured = self.taps.take()  # [1, T, K*H] for positions last_forward_start …
        if self.last_forward_start > 0:
            self.stats.acceptance_lengths.append(cur_len - 1 - self.last_forward_start)
        self.stats.num_target_forwards += 1
        context = captured[:, self.context_len - self.last_forward_start : cur_len - 1 - self.last_forward_start]
        context_positions = torch.arange(self.context_len, cur_len - 1, device=input_ids.device)[None]
        self.context_len = cur_len - 1
        anchor_position = torch.tensor([cur_len - 1], device=input_ids.device)
        draft_logits = self.session.propose(input_ids[:, -1], anchor_position, context, context_positions)
        budget = self.session.max_drafts
        if self.max_length is not None:
            budget = min(budget, self.max_length - cur_len - 1)
        drafts = draft_logits[:, : max(budget, 0)].argmax(dim=-1).to(input_ids.device)
        self.last_forward_start = cur_len - 1
        self.stats.draft_time_s += time.perf_counter() - t0
        return torch.cat((input_ids, drafts), dim=1), None

    @property
    def num_drafting_tokens(self) -> int:
        """Drafts proposed per step at most (transformers >= 5.25 asks, to size what a recurrent cache keeps)."""
        return self.session.max_drafts

    def update_candidate_strategy(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, num_matches: int) -> None:
        """DFlash always proposes a full block; acceptance is inferred from ``input_ids`` in ``get_candidates``.

        Older releases (5.15) declare this abstract and call it after every verify step, so it must exist.
        """

    def finish(self, final_len: int, prompt_len: int) -> None:
        """Record the last verify step (no get_candidates call follows it) and the token count."""
        self.stats.new_tokens = final_len - prompt_len
        if self.last_forward_start is None:
            return
        self.stats.num_target_forwards += 1
        if self.last_forward_start > 0:
            self.stats.acceptance_lengths.append(final_len - 1 - self.last_forward_start)

    def close(self) -> None:
        self.taps.close()


# ------------------------------------------------------------------------------------------------------------------
# Zero-flag dispatch
# ------------------------------------------------------------------------------------------------------------------
def install_generate_patch() -> None:
    """Make ``generate(assistant_model=<DFlash drafter>)`` use DFlash. Idempotent across module copies.

    Three private ``GenerationMixin`` methods are wrapped; each wrapper only acts when the assistant carries the
    ``is_dflash_drafter`` marker and otherwise calls the original. The wrappers delegate to methods of the
    drafter itself, so whichever copy of this module (package or remote code) installed them first, each
    drafter runs its own code.
    """
    if getattr(GenerationMixin, "_dflash_patch_installed", False):
        return
    original_validate = GenerationMixin._validate_generation_mode
    original_get_generator = GenerationMixin._get_candidate_generator
    original_assisted = GenerationMixin._assisted_decoding

    @functools.wraps(original_validate)
    def _validate_generation_mode(self, *args, **kwargs):
        assistant = assistant_from_validate_args(args, kwargs)
        if _looks_like_untrusted_dflash_checkpoint(assistant):
            raise ValueError(
                f"The assistant is a plain {type(assistant).__name__} built from a DFlash checkpoint: it was loaded "
                "without its remote code. Load it with AutoModel.from_pretrained(repo, trust_remote_code=True) "
                "or dflash_hf.DFlashDraftModel.from_pretrained(repo)."
            )
        if is_dflash_drafter(assistant):
            mode = args[0] if args else kwargs.get("generation_mode")
            if getattr(mode, "value", mode) != "assisted_generation":
                raise ValueError(
                    f"Generation mode {getattr(mode, 'value', mode)!r} (e.g. beam search, num_beams > 1) cannot use "
                    "a DFlash assistant, which verifies one greedy or sampled continuation. Set num_beams=1, or "
                    "drop assistant_model."
                )
            assistant._dflash_validate(self)
            generation_config = generation_config_from_validate_args(args, kwargs)
            if generation_config is not None and generation_config.use_cache is False:
                # Runs before generate prepares its cache. DFlash verifies blocks against a KV cache; with or without
                # one the target computes the same tokens, so the request is honoured in what it returns.
                logger.warning_once(
                    "use_cache=False is ignored with a DFlash assistant: DFlash needs the target's KV cache (the "
                    "output is the same). Drop use_cache=False to silence this warning."
                )
                generation_config.use_cache = True
            if getattr(self, "_is_stateful", False) and stock_loop_refuses_stateful():
                # transformers < 5.25 refuses assisted decoding on stateful (hybrid) models because its loop cannot
                # roll their states back; the DFlash loop can, that stock loop cannot.
                if DFlashOptions.from_drafter(assistant).generation_loop == "transformers":
                    raise ValueError(
                        f"{type(self).__name__} keeps linear-attention state that transformers' assisted loop cannot "
                        "roll back. Use the DFlash loop (drafter.generation_loop = 'dflash', the default)."
                    )
                with stateful_check_lifted(self):
                    return original_validate(self, *args, **kwargs)
        return original_validate(self, *args, **kwargs)

    @functools.wraps(original_get_generator)
    def _get_candidate_generator(self, generation_config, *args, **kwargs):
        assistant = kwargs.get("assistant_model")
        if is_dflash_drafter(assistant):
            if generation_config.prompt_lookup_num_tokens is not None:
                raise ValueError(
                    "prompt_lookup_num_tokens with a DFlash assistant needs drafter.generation_loop = 'dflash' "
                    "(the default): transformers' assisted loop takes one kind of proposal per call."
                )
            generator = DFlashCandidateGenerator(self, assistant, generation_config)
            getattr(assistant, "_dflash_open_generators", []).append(generator)  # closed by _assisted_decoding
            return generator
        return original_get_generator(self, generation_config, *args, **kwargs)

    @functools.wraps(original_assisted)
    def _assisted_decoding(self, *args, **kwargs):
        assistant = kwargs.get("assistant_model")
        if not is_dflash_drafter(assistant):
            return original_assisted(self, *args, **kwargs)
        if DFlashOptions.from_drafter(assistant).generation_loop != "transformers":
            return assistant._dflash_decode(self, *args, **kwargs)
        filled = cache_from_model_kwargs(kwargs)
        if filled is not None and filled.get_seq_length() > 0:
            raise ValueError(
                "drafter.generation_loop = 'transformers' cannot continue from a filled cache: transformers' assisted "
                "loop returns different tokens from plain generate there (with any assistant, also prompt lookup). "
                "Use the DFlash loop (drafter.generation_loop = 'dflash', the default), or pass no cache."
            )
        generators = assistant._dflash_open_generators = []
        try:
            result = original_assisted(self, *args, **kwargs)
            sequences = result if isinstance(result, torch.Tensor) else result.sequences
            prompt = args[0] if args else kwargs["input_ids"]
            mask = kwargs.get("attention_mask")
            for generator in generators:
                generator.finish(sequences.shape[1], prompt.shape[1])
                report_finished_call(assistant, sequences, torch.ones_like(prompt) if mask is None else mask,
                                     generator.stats, kwargs.get("generation_config"))
            return result
        finally:
            for generator in generators:
                generator.close()
            assistant._dflash_open_generators = []

    GenerationMixin._validate_generation_mode = _validate_generation_mode
    GenerationMixin._get_candidate_generator = _get_candidate_generator
    GenerationMixin._assisted_decoding = _assisted_decoding
    GenerationMixin._dflash_patch_installed = True


__all__ = ["DFlashCandidateGenerator", "install_generate_patch", "is_dflash_drafter"]

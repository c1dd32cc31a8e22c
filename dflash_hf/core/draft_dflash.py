"""The drafter's side of DFlash decoding: the block it opens after each committed token and the session that
drafts it (the draft cache of context features, the target's shared embedding and LM head).

Portable core: imports only torch, transformers and sibling modules; copied into every published drafter.
"""

from __future__ import annotations

import torch
from torch import nn

from .cache_dflash import DraftCache
from .matmul_dflash import few_row_products, planned_linear
from .pair_dflash import DFlashOptions


def draft_block(anchor: torch.Tensor, block_size: int, mask_token_id: int) -> torch.Tensor:
    """The drafter's input block ``[anchor, MASK × (block_size - 1)]`` for each anchor [R] -> [R, block_size]
    (the decode loop drafts one per row; training opens one per sampled anchor)."""
    block = torch.full((anchor.shape[0], block_size), mask_token_id, dtype=torch.long, device=anchor.device)
    block[:, 0] = anchor
    return block


class DraftSession:
    """The drafter's side of one generation: the draft cache and the target's shared embedding and LM head."""

    def __init__(self, target: nn.Module, drafter: nn.Module, options: DFlashOptions | None = None) -> None:
        self.drafter = drafter
        self.embed = target.get_input_embeddings()
        self.lm_head = target.get_output_embeddings()
        self.block_size = drafter.config.block_size
        self.mask_token_id = drafter.config.mask_token_id
        self.device = drafter.fc.weight.device
        self.cache = DraftCache()
        self.options = options or DFlashOptions.from_drafter(drafter)
        self.max_drafts = self.options.max_drafts
        self._full_logits: torch.Tensor | None = None  # [R, n, V], -inf off the draft vocabulary (see draft_logits)

    @torch.no_grad()
    def propose(
        self,
        anchor: torch.Tensor,
        anchor_position: torch.Tensor,
        context_taps: torch.Tensor,
        context_positions: torch.Tensor,
        num_drafts: int | None = None,
    ) -> torch.Tensor:
        """Draft logits for the B-1 slots after ``anchor``.

        anchor: [R] token ids opening the block; anchor_position: [R] their positions.
        context_taps: [R, C, K*H] taps of committed positions not yet in the draft cache; context_positions: [R, C].
        Returns [R, n, V] logits from the target's LM head, n = ``num_drafts`` (default ``max_drafts``: B-1 unless
        the drafter's ``num_speculative_tokens`` asks for fewer); only those slots go through the LM head.
        """
        num_drafts = self.max_drafts if num_drafts is None else num_drafts
        block = draft_block(anchor, self.block_size, self.mask_token_id)
        offsets = torch.arange(self.block_size, device=anchor_position.device)
        block_positions = anchor_position[:, None] + offsets  # [R, B]
        embeds = self.embed(block.to(self.embed.weight.device))
        with few_row_products(self.device, self.options.few_row_matmul_on_cpu):
            hidden = self.drafter(
                embeds.to(self.device),
                context_taps.to(self.device),
                block_positions.to(self.device),
                context_positions.to(self.device),
                cache=self.cache,
                output_slots=slice(1, 1 + num_drafts),  # only the slots that will be verified: [R, n, H]
            )
            return self.draft_logits(hidden)

    def draft_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[R, n, H] drafter states -> [R, n, V] logits over the whole vocabulary. With a reduced draft vocabulary
        only its rows of the LM head are multiplied and every other token gets -inf (never drafted).

        The full-vocabulary tensor is one buffer per session, filled with -inf once: each block writes only the
        draft vocabulary's columns, so the rest stay -inf. What is returned is valid until the next call."""
        head, vocab = self.draft_head()
        hidden = hidden.to(device=head.weight.device, dtype=head.weight.dtype)
        logits = planned_linear(hidden, head.weight, head.bias) if type(head) is nn.Linear else head(hidden)
        if vocab is None:
            return logits
        rows, slots = logits.shape[:2]
        buffer = self._full_logits
        if buffer is None or buffer.shape[0] < rows or buffer.shape[1] < slots or buffer.dtype != logits.dtype:
            buffer = logits.new_full((rows, slots, self.lm_head.out_features), float("-inf"))
            self._full_logits = buffer
        return buffer[:rows, :slots].index_copy_(-1, vocab, logits)

    def draft_head(self) -> tuple[nn.Module, torch.Tensor | None]:
        """The head drafts go through and the token ids of its rows (None: the whole vocabulary, in order).

        It is the target's LM head, cast to the drafter's dtype when the two differ (e.g. a bfloat16 drafter of a
        float32 target on CPU), and cut to the drafter's ``draft_vocab`` when it has one: drafts are only
        proposals, so neither changes the output. The copy is kept on the drafter and remade when the head's
        weights change. A head that is not a plain linear layer (quantized) is used as it is, whole."""
        head = self.lm_head
        dtype = self.drafter.fc.weight.dtype
        draft_vocab = getattr(self.drafter.config, "draft_vocab", None)
        plain = type(head) is nn.Linear and head.weight.is_floating_point()
        if not plain or (head.weight.dtype == dtype and draft_vocab is None):
            return head, None
        key = (head.weight.data_ptr(), head.weight._version, dtype, head.weight.device, id(draft_vocab))
        cached = getattr(self.drafter, "_draft_head_cache", None)
        if cached is None or cached[0] != key:
            vocab = None if draft_vocab is None else torch.tensor(draft_vocab, device=head.weight.device)
            rows = head.weight if vocab is None else head.weight.index_select(0, vocab)
            copy = nn.Linear(head.in_features, rows.shape[0], bias=head.bias is not None,
                             device=head.weight.device, dtype=dtype).requires_grad_(False)
            copy.weight.copy_(rows)
            if head.bias is not None:
                copy.bias.copy_(head.bias if vocab is None else head.bias.index_select(0, vocab))
            cached = (key, copy, vocab)
            self.drafter._draft_head_cache = cached  # a plain attribute (a tuple): never saved, moved or trained
        return cached[1], cached[2]


__all__ = ["DraftSession", "draft_block"]

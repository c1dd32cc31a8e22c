"""Caches: the drafter's context cache, and the surgery DFlash does on the target's KV cache.

Portable core: imports only torch, transformers and sibling modules; copied into every published drafter.

- ``DraftCache``: context keys/values of every drafter layer, for committed positions only.
- Target cache surgery: crop rejected drafts, roll hybrid (Gated-DeltaNet) states back by snapshot, keep rows of
  a batch, gather each row's live slots together (batched decoding leaves rejected slots as masked holes).
- Multi-turn reuse: the drafter's context travels on the target cache a one-row generate returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .transformers_compat import linear_layer_token_count


@dataclass
class DraftCache:
    """Context keys/values of every drafter layer: committed positions only, never the block.

    ``keys[i]`` / ``values[i]``: [B, kv_heads, C_i, head_dim]; ``positions[i]``: [B, C_i] absolute positions of
    those entries (``-1`` marks padding, which no query attends to). Sliding-window layers keep only what a
    future query can still see, so the cache is bounded by the window there.

    Appending (``append``, ``with_block``) writes into spare room of a per-layer storage and leaves views of it
    in ``keys`` / ``values`` / ``positions``, so a step copies only its new entries, not the whole context. Any
    other tensor assigned there (rows selected, compaction, tests) is simply moved into fresh storage on the next
    append.
    """

    keys: list = field(default_factory=list)
    values: list = field(default_factory=list)
    positions: list = field(default_factory=list)
    # layer -> (keys [B, kv_heads, capacity, head_dim], values alike, positions [B, capacity], the views
    # it last lent to keys/values/positions, where they start in it)
    _storage: dict = field(default_factory=dict, repr=False, compare=False)

    def length(self, layer: int = 0) -> int:
        return 0 if layer >= len(self.keys) else self.keys[layer].shape[2]

    def nbytes(self) -> int:
        """Bytes of the entries held; their storage keeps up to about as much again as spare room."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values, *self.positions))

    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
               room: int = 0) -> None:
        """Add entries (keys/values [B, kv_heads, N, head_dim], positions [B, N]) to ``layer``, the next layer
        when it has none yet; ``room``: slots to keep free after them (a block ``with_block`` will write)."""
        if layer == len(self.keys):
            self.keys.append(keys[:, :, :0])
            self.values.append(values[:, :, :0])
            self.positions.append(positions[:, :0])
        count = keys.shape[2]
        key_store, value_store, position_store, start = self._room(layer, count + room)
        if not count:
            return
        # narrow + copy_ rather than slice assignment: fewer dispatches, and this runs in every drafter layer
        length = self.keys[layer].shape[2]
        key_store.narrow(2, start + length, count).copy_(keys)
        value_store.narrow(2, start + length, count).copy_(values)
        position_store.narrow(1, start + length, count).copy_(positions)
        self._lend_views(layer, start, length + count)

    def with_block(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``layer``'s keys and values followed by a block's ([B, kv_heads, Q, head_dim]), as [B, kv_heads, C+Q,
        head_dim] views: the block goes into the free room after the cache (the next append overwrites it), so
        attention over context and block needs no copy of the context."""
        count = keys.shape[2]
        key_store, value_store, _, start = self._room(layer, count)
        length = self.keys[layer].shape[2]
        key_store.narrow(2, start + length, count).copy_(keys)
        value_store.narrow(2, start + length, count).copy_(values)
        return key_store.narrow(2, start, length + count), value_store.narrow(2, start, length + count)

    def _room(self, layer: int, extra: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """``layer``'s storage with ``extra`` free slots after its entries, and where the entries start in it;
        afterwards the layer's tensors are views of it. Storage that no longer holds them, or is full, is replaced
        by storage of twice the need (the entries copied over): growth costs amortised O(1) copies per entry."""
        keys, values, positions = self.keys[layer], self.values[layer], self.positions[layer]
        stored = self._storage.get(layer)
        if stored is not None:
            key_store, value_store, position_store, lent, start = stored
            if not (lent[0] is keys and lent[1] is values and lent[2] is positions):
                # set from outside (e.g. drop_from's shorter views): find them in the storage, if they are there
                start = _start_in(keys, key_store, dim=2)
                if start is None or start != _start_in(values, value_store, 2) or start != _start_in(
                        positions, position_store, 1):
                    start = None
                else:
                    self._storage[layer] = (key_store, value_store, position_store, (keys, values, positions), start)
            if start is not None and start + keys.shape[2] + extra <= key_store.shape[2]:
                return key_store, value_store, position_store, start
        length = keys.shape[2]
        capacity = 2 * (length + extra) + 16
        key_store = keys.new_empty(keys.shape[0], keys.shape[1], capacity, keys.shape[3])
        value_store = values.new_empty(values.shape[0], values.shape[1], capacity, values.shape[3])
        position_store = positions.new_full((positions.shape[0], capacity), -1)
        key_store.narrow(2, 0, length).copy_(keys)
        value_store.narrow(2, 0, length).copy_(values)
        position_store.narrow(1, 0, length).copy_(positions)
        self._storage[layer] = (key_store, value_store, position_store, (None, None, None), 0)
        self._lend_views(layer, 0, length)
        return key_store, value_store, position_store, 0

    def _lend_views(self, layer: int, start: int, length: int) -> None:
        """Make ``layer``'s tensors the views [start, start + length) of its storage, and remember them: while they
        are still the layer's tensors, ``_room`` needs no search."""
        key_store, value_store, position_store, _, _ = self._storage[layer]
        self.keys[layer] = key_store.narrow(2, start, length)
        self.values[layer] = value_store.narrow(2, start, length)
        self.positions[layer] = position_store.narrow(1, start, length)
        lent = (self.keys[layer], self.values[layer], self.positions[layer])
        self._storage[layer] = (key_store, value_store, position_store, lent, start)

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only batch rows ``rows`` (finished rows of a batch leave the cache)."""
        for i in range(len(self.keys)):
            self.keys[i] = self.keys[i][rows]
            self.values[i] = self.values[i][rows]
            self.positions[i] = self.positions[i][rows]

    def drop_from(self, position: int) -> None:
        """Forget every entry at ``position`` or later (a rewound or shorter target cache). One row only."""
        for i in range(len(self.keys)):
            keep = int((self.positions[i][0] < position).sum())  # one row's positions only increase
            self.keys[i] = self.keys[i][:, :, :keep]
            self.values[i] = self.values[i][:, :, :keep]
            self.positions[i] = self.positions[i][:, :keep]

    def padding_slots(self, layer: int = 0) -> int:
        """Entries a compaction would free: cache length minus the most real entries any row holds."""
        if layer >= len(self.positions) or self.positions[layer].numel() == 0:
            return 0
        real = (self.positions[layer] >= 0).sum(dim=1)
        return self.positions[layer].shape[1] - int(real.max())

    def compact(self) -> None:
        """Squeeze out padding: each row's real entries move right, in order, behind left padding."""
        for i in range(len(self.keys)):
            order, keep = compaction_order(self.positions[i] >= 0)
            self.positions[i] = self.positions[i].gather(1, order).masked_fill(~keep, -1)
            index = order[:, None, :, None].expand(-1, self.keys[i].shape[1], -1, self.keys[i].shape[3])
            self.keys[i] = self.keys[i].gather(2, index)
            self.values[i] = self.values[i].gather(2, index)


def _start_in(view: torch.Tensor, storage: torch.Tensor, dim: int) -> int | None:
    """Where ``view`` starts along ``dim`` when it is a run of whole slices of ``storage`` along that dim (the
    same memory, shape and strides but for ``dim``'s length), else None."""
    if (view.dtype != storage.dtype or view.device != storage.device or view.stride() != storage.stride()
            or view.shape[:dim] != storage.shape[:dim] or view.shape[dim + 1:] != storage.shape[dim + 1:]):
        return None
    step = storage.stride(dim) * storage.element_size()
    offset = view.data_ptr() - storage.data_ptr()
    if offset < 0 or offset % step or view.untyped_storage().data_ptr() != storage.untyped_storage().data_ptr():
        return None
    return offset // step


def compaction_order(real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For a [R, S] mask of real slots: gather indices [R, S'] that put each row's real slots last, in order,
    behind padding, with S' the largest real count of any row; and the [R, S'] mask of real slots after it."""
    count = real.sum(dim=1)
    width = int(count.max()) if real.numel() else 0
    order = torch.sort(real.to(torch.int8), dim=1, stable=True).indices[:, real.shape[1] - width :]
    keep = torch.arange(width, device=real.device)[None, :] >= (width - count)[:, None]
    return order, keep



# ------------------------------------------------------------------------------------------------------------------
# Target cache surgery
# ------------------------------------------------------------------------------------------------------------------
def crop_cache(cache: Any, tokens_to_remove: int) -> None:
    """Drop the last ``tokens_to_remove`` positions of a transformers cache (no-op for 0)."""
    if tokens_to_remove < 0:
        raise ValueError(f"tokens_to_remove must be >= 0, got {tokens_to_remove}.")
    if tokens_to_remove:
        cache.crop(-tokens_to_remove)


def uncroppable_cache_problem(cache: Any) -> str | None:
    """Why DFlash cannot drop a rejected block's positions from ``cache`` (None when it can): an attention layer
    without ``crop``, as older transformers releases' StaticLayer (a static cache)."""
    for layer in getattr(cache, "layers", ()):
        if not is_linear_attention_layer(layer) and not hasattr(layer, "crop"):
            return (f"its {type(layer).__name__} layers cannot drop positions on this transformers release, so "
                    "rejected drafts could not be undone; drop cache_implementation (the default dynamic cache "
                    "works) or upgrade transformers")
    return None


def activate_past_recording(cache: Any) -> None:
    """Sliding-window layers must keep the entries they would evict, or a rejected block cannot be undone.

    Linear-attention layers are left alone: recording would grow their conv states every step, and their
    recurrent state cannot be cropped anyway (``LinearStateSnapshot`` rolls them back instead).
    """
    layers = getattr(cache, "layers", None)
    if layers is None:
        activate = getattr(cache, "activate_past_recording", None)
        if activate is not None:
            activate()
        return
    for layer in layers:
        if not is_linear_attention_layer(layer) and hasattr(layer, "activate_past_recording"):
            layer.activate_past_recording()


def is_linear_attention_layer(layer: Any) -> bool:
    return isinstance(getattr(layer, "recurrent_states", None), dict)


def has_linear_attention(cache: Any) -> bool:
    return any(is_linear_attention_layer(layer) for layer in getattr(cache, "layers", ()))


class LinearStateSnapshot:
    """Rollback for hybrid caches: copies of every linear-attention layer's conv and recurrent states.

    ``take()`` before a verify forward; ``restore(n)`` afterwards puts the linear layers back as they were and
    drops the last ``n`` positions of the attention layers, i.e. undoes the whole verify forward.
    """

    def __init__(self, cache: Any) -> None:
        self.cache = cache
        self.saved: list[tuple[Any, dict, dict, torch.Tensor | None]] = []

    def take(self) -> None:
        self.saved = [
            (layer, _clone_states(layer.conv_states), _clone_states(layer.recurrent_states), _token_count(layer))
            for layer in self.cache.layers
            if is_linear_attention_layer(layer)
        ]

    def restore(self, attention_tokens_to_remove: int) -> None:
        for layer, conv, recurrent, count in self.saved:
            for store, saved in ((layer.conv_states, conv), (layer.recurrent_states, recurrent)):
                for index, tensor in saved.items():
                    if tensor is not None:
                        store[index].copy_(tensor)
            if count is not None:
                layer.cumulative_length_linear.copy_(count)
        if attention_tokens_to_remove:
            for layer in self.cache.layers:
                if not is_linear_attention_layer(layer):
                    layer.crop(-attention_tokens_to_remove)


def _token_count(layer: Any) -> torch.Tensor | None:
    count = linear_layer_token_count(layer)
    return None if count is None else count.clone()


def _clone_states(states: dict) -> dict:
    return {index: None if tensor is None else tensor.clone() for index, tensor in states.items()}


def ragged_batch_problem(cache: Any) -> str | None:
    """Why the batched DFlash loop cannot keep ragged rows in ``cache`` (None when it can).

    The loop leaves rejected slots in place as masked holes and later gathers the live slots together, which
    needs plain per-slot key/value tensors: sliding-window layers index by slot distance, and linear-attention
    layers hold one state per row that a hole cannot be cut out of.
    """
    layers = getattr(cache, "layers", None)
    if layers is None:
        return f"{type(cache).__name__} does not expose its layers"
    for layer in layers:
        if is_linear_attention_layer(layer):
            return "the target has linear-attention (Gated DeltaNet) layers"
        if getattr(layer, "is_sliding", False):
            return "the target has sliding-window attention layers"
        if not hasattr(layer, "keys") or not hasattr(layer, "values"):
            return f"cache layer {type(layer).__name__} holds no per-slot keys/values"
    return None


def select_cache_rows(cache: Any, rows: torch.Tensor) -> None:
    """Keep batch rows ``rows`` of every cache layer (transformers' per-layer ``batch_select_indices``)."""
    for layer in cache.layers:
        layer.batch_select_indices(rows)


def gather_cache_slots(cache: Any, order: torch.Tensor) -> None:
    """Rebuild every layer from slots ``order`` [R, S'] of each row (keys carry their RoPE, so slots can move)."""
    for layer in cache.layers:
        if getattr(layer, "is_initialized", True) and layer.keys is not None and layer.keys.numel():
            index = order[:, None, :, None].to(layer.keys.device)
            layer.keys = layer.keys.gather(2, index.expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3]))
            layer.values = layer.values.gather(2, index.expand(-1, layer.values.shape[1], -1, layer.values.shape[3]))



# Batched decoding leaves each row's rejected slots in the target cache as holes hidden by the attention mask;
# once holes exceed COMPACT_MIN_HOLES and a quarter of the cache, each row's live slots are gathered together.
COMPACT_MIN_HOLES = 32


def compact_if_wasteful(cache: Any, attention_mask: torch.Tensor, draft_cache: Any) -> bool:
    """Squeeze holes out of both caches once they are worth a gather; True when the target cache was compacted."""
    compacted = False
    slots = attention_mask.shape[1]
    holes = slots - int(attention_mask.sum(dim=1).max())
    if holes >= max(COMPACT_MIN_HOLES, slots // 4):
        order, _ = compaction_order(attention_mask.bool())
        gather_cache_slots(cache, order)
        compacted = True
    draft_length = draft_cache.length()
    if draft_cache.padding_slots() >= max(COMPACT_MIN_HOLES, draft_length // 4):
        draft_cache.compact()
    return compacted


def left_aligned_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """The mask after compaction: each row's live slots last."""
    count = attention_mask.sum(dim=1)
    width = int(count.max())
    return (torch.arange(width, device=attention_mask.device)[None, :] >= (width - count)[:, None]).long()


# ------------------------------------------------------------------------------------------------------------------
# Generating on a filled cache (multi-turn reuse)
# ------------------------------------------------------------------------------------------------------------------
DRAFT_CONTEXT_ATTR = "_dflash_draft_context"


@dataclass
class SavedDraftContext:
    """The drafter's context left on a target cache that a one-row DFlash generate returned.

    ``draft_cache`` holds the context of every position but the last accepted block's, which is ``pending``
    [1, C, K*H] at ``pending_positions`` [1, C]; together they cover every position the target cache holds.
    ``owner`` names the drafter whose weights produced them.
    """

    owner: tuple
    draft_cache: Any
    pending: torch.Tensor
    pending_positions: torch.Tensor


def _drafter_identity(drafter: nn.Module) -> tuple:
    weight = drafter.fc.weight
    return id(drafter), weight.data_ptr(), weight._version


def prompt_tokens_in_cache(cache: Any, input_ids: torch.Tensor) -> int:
    """How many leading prompt tokens ``cache`` already holds (0 for the fresh cache generate makes)."""
    cached = cache.get_seq_length()
    if cached >= input_ids.shape[1]:
        raise ValueError(
            f"The cache passed to generate already holds {cached} positions but the prompt has only "
            f"{input_ids.shape[1]} tokens. The cache must hold a strict prefix of the prompt: pass the previous "
            "turn's cache with the previous sequences followed by the new turn's tokens, or a fresh cache."
        )
    return cached


def keep_draft_context(
    cache: Any, drafter: nn.Module, draft_cache: DraftCache, pending: torch.Tensor, pending_positions: torch.Tensor
) -> None:
    """Leave the drafter's context on the returned target cache, so that a generate continuing from that cache
    (the next turn of a chat) drafts with the whole conversation as context, not just the new turn."""
    setattr(cache, DRAFT_CONTEXT_ATTR, SavedDraftContext(
        _drafter_identity(drafter), draft_cache, pending, pending_positions
    ))


def resume_draft_context(
    cache: Any, drafter: nn.Module, cached: int, context: torch.Tensor, context_positions: torch.Tensor
) -> tuple[DraftCache | None, torch.Tensor, torch.Tensor]:
    """The draft cache and first context when the target cache already held ``cached`` prompt tokens.

    When an earlier one-row DFlash generate of the same drafter left its context on the cache, the drafter gets
    it back (cut to the cached positions) and drafts as if it had seen the whole prompt. Otherwise (a cache
    filled by plain generate, or a batch) the drafter sees only the uncached tokens: fewer drafts accepted in
    this call, the same output tokens, since the target decides every one of them. Returns (draft cache or
    None for a fresh one, context [1, C, K*H], context positions [1, C]).
    """
    saved = getattr(cache, DRAFT_CONTEXT_ATTR, None)
    if saved is None or saved.owner != _drafter_identity(drafter) or context.shape[0] != 1:
        return None, context, context_positions
    covered = int(saved.pending_positions[0, -1]) + 1 if saved.pending_positions.numel() else saved.draft_cache.length()
    if covered < cached:  # the target cache grew after the drafter last saw it
        return None, context, context_positions
    saved.draft_cache.drop_from(cached)
    keep = saved.pending_positions[0] < cached
    pending, pending_positions = saved.pending[:, keep], saved.pending_positions[:, keep]
    return (saved.draft_cache,
            torch.cat((pending.to(context.device), context), dim=1),
            torch.cat((pending_positions.to(context_positions.device), context_positions), dim=1))

"""Every difference between the transformers releases we support (5.15 … 5.x), in one place.

Portable core: imports only torch, transformers and siblings; copied into every published drafter.

What differs across the range (see shared/reference/hf-integration.md §3):
- the cache keyword: ``past_key_values`` up to 5.23, ``cache`` from 5.24 (in generate's model_kwargs, in model
  forwards and in generate's output dataclasses);
- ``Cache.crop``: only ``crop(-n)`` with ``n > 0`` means the same thing everywhere;
- decoder layers return a tensor in recent releases and a tuple in older ones;
- hybrid targets (Qwen3-Next, Qwen3.5): linear-attention cache layers hold ``conv_states`` /
  ``recurrent_states`` dicts (state index -> tensor) that ``crop`` cannot roll back.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import torch
import transformers
from transformers.generation.utils import GenerateDecoderOnlyOutput

TRANSFORMERS_VERSION = tuple(int(p) for p in transformers.__version__.split(".")[:2] if p.isdigit())

_OUTPUT_FIELDS = {f.name for f in dataclasses.fields(GenerateDecoderOnlyOutput)}
_OUTPUT_CACHE_FIELD = "cache" if "cache" in _OUTPUT_FIELDS else "past_key_values"


def cache_from_model_kwargs(model_kwargs: dict) -> Any:
    cache = model_kwargs.get("cache")
    return cache if cache is not None else model_kwargs.get("past_key_values")


def forward_cache_kwarg(model: torch.nn.Module) -> str:
    """Name under which ``model.forward`` takes its KV cache."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def crop_cache(cache: Any, tokens_to_remove: int) -> None:
    """Drop the last ``tokens_to_remove`` positions of a transformers cache (no-op for 0)."""
    if tokens_to_remove < 0:
        raise ValueError(f"tokens_to_remove must be >= 0, got {tokens_to_remove}.")
    if tokens_to_remove:
        cache.crop(-tokens_to_remove)


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
        self.saved: list[tuple[Any, dict, dict]] = []

    def take(self) -> None:
        self.saved = [
            (layer, _clone_states(layer.conv_states), _clone_states(layer.recurrent_states))
            for layer in self.cache.layers
            if is_linear_attention_layer(layer)
        ]

    def restore(self, attention_tokens_to_remove: int) -> None:
        for layer, conv, recurrent in self.saved:
            for store, saved in ((layer.conv_states, conv), (layer.recurrent_states, recurrent)):
                for index, tensor in saved.items():
                    if tensor is not None:
                        store[index].copy_(tensor)
        if attention_tokens_to_remove:
            for layer in self.cache.layers:
                if not is_linear_attention_layer(layer):
                    layer.crop(-attention_tokens_to_remove)


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


def layer_output_hidden(output: Any) -> torch.Tensor:
    """The hidden states a decoder layer returned (a tensor, or the first item of a tuple)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def make_generate_output(sequences: torch.Tensor, cache: Any, **fields: Any) -> GenerateDecoderOnlyOutput:
    kwargs = {k: v for k, v in fields.items() if k in _OUTPUT_FIELDS}
    kwargs[_OUTPUT_CACHE_FIELD] = cache
    return GenerateDecoderOnlyOutput(sequences=sequences, **kwargs)


__all__ = [
    "LinearStateSnapshot",
    "TRANSFORMERS_VERSION",
    "activate_past_recording",
    "cache_from_model_kwargs",
    "crop_cache",
    "forward_cache_kwarg",
    "gather_cache_slots",
    "has_linear_attention",
    "is_linear_attention_layer",
    "layer_output_hidden",
    "make_generate_output",
    "ragged_batch_problem",
    "select_cache_rows",
]

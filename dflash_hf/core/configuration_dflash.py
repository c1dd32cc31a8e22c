"""Configuration of a DFlash block-diffusion drafter.

Portable core: imports only torch, transformers and sibling modules (relative imports). This file is copied
verbatim into every published drafter repository.

The on-disk format is z-lab's: a Qwen3 config (``model_type: "qwen3"``, ``architectures: ["DFlashDraftModel"]``)
plus top-level ``block_size`` and ``num_target_layers`` and a nested
``dflash_config: {mask_token_id, target_layer_ids}``. vLLM and SGLang key their DFlash loaders on exactly these
names, so keeping them is what lets our drafters serve there too. The price of ``model_type: "qwen3"`` is that
``AutoModel.from_pretrained(repo)`` WITHOUT ``trust_remote_code=True`` silently builds a plain ``Qwen3Model``;
the generate patch detects that case and says how to fix it (see ``generation_dflash``).
"""

from __future__ import annotations

import math
from typing import Any

from transformers import PretrainedConfig

from .transformers_compat import config_errors_as_value_errors

_LAYER_TYPES = ("full_attention", "sliding_attention")


def default_target_layer_ids(num_target_layers: int, num_taps: int) -> list[int]:
    """Distinct taps: one in the middle, else ``num_taps`` ids spread evenly over ``1 … L-3``.

    ``1 … L-3`` holds only ``L - 3`` layers, so a shallow target gets fewer taps than asked for (as many as it
    has distinct layers there; one in the middle below 5 layers) rather than the same layer twice.
    """
    if num_taps < 1:
        raise ValueError(f"num_taps must be >= 1, got {num_taps}.")
    if num_target_layers < 1:
        raise ValueError(f"num_target_layers must be >= 1, got {num_target_layers}.")
    num_taps = min(num_taps, max(1, num_target_layers - 3))
    if num_taps == 1:
        return [num_target_layers // 2]
    first, last = 1, num_target_layers - 3
    # Spacing (last - first) / (num_taps - 1) >= 1 here, so rounding never repeats a layer.
    return [round(first + k * (last - first) / (num_taps - 1)) for k in range(num_taps)]


class DFlashConfig(PretrainedConfig):
    r"""Configuration of a [`DFlashDraftModel`].

    Qwen3-style decoder layers (q/k RMSNorm, RoPE, GQA, SwiGLU) whose keys and values are extended with the
    projected hidden states of ``target_layer_ids``; queries come from a block ``[anchor, MASK × (block_size-1)]``.

    Args:
        block_size: tokens per drafted block, the anchor included (so ``block_size - 1`` drafts per step).
        num_target_layers: decoder layers of the target the drafter was built for.
        dflash_config: ``{"mask_token_id": int, "target_layer_ids": list[int]}`` (z-lab's nesting). The flat
            ``mask_token_id`` / ``target_layer_ids`` attributes mirror it.
        target_hidden_size: hidden size of the target (defaults to ``hidden_size``); ``fc`` maps
            ``len(target_layer_ids) * target_hidden_size`` to ``hidden_size``.
        num_speculative_tokens: drafts verified per step by default (1 … ``block_size - 1``; absent or None: all).
            A drafter that is rarely accepted far into its block verifies fewer and saves the target the extra rows.
            Only the default of ``DFlashDraftModel.num_speculative_tokens``, which a user may change per model.
        draft_vocab: optional sorted list of distinct token ids the drafter proposes from (a reduced draft
            vocabulary: the head multiplies only these rows of the target's LM head). The target still verifies
            over the whole vocabulary, so outputs never change. Readers that do not know the key (vLLM, z-lab's
            loader) ignore it and draft over the whole vocabulary. Absent: the whole vocabulary.
        The remaining arguments mean what they mean in ``Qwen3Config``.
    """

    model_type = "qwen3"
    # In-block attention: None means z-lab's rule (sliding layers causal, full layers not); kept out of config.json
    # unless set.
    is_causal: bool | None = None
    num_speculative_tokens: int | None = None
    draft_vocab: list[int] | None = None

    def __init__(
        self,
        vocab_size: int = 151936,
        hidden_size: int = 4096,
        intermediate_size: int = 12288,
        num_hidden_layers: int = 1,
        num_attention_heads: int = 32,
        num_key_value_heads: int | None = 8,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 40960,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        rope_theta: float | None = None,
        rope_scaling: dict | None = None,
        rope_parameters: dict | None = None,
        attention_bias: bool = False,
        attention_dropout: float = 0.0,
        use_sliding_window: bool = False,
        sliding_window: int | None = None,
        max_window_layers: int | None = None,
        layer_types: list[str] | None = None,
        block_size: int = 16,
        num_target_layers: int | None = None,
        target_hidden_size: int | None = None,
        dflash_config: dict | None = None,
        mask_token_id: int | None = None,
        target_layer_ids: list[int] | None = None,
        tie_word_embeddings: bool = False,
        is_causal: bool | None = None,
        num_speculative_tokens: int | None = None,
        draft_vocab: list[int] | None = None,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = _as_int("vocab_size", vocab_size, minimum=1, maximum=_MAX_VOCAB)
        self.hidden_size = _as_int("hidden_size", hidden_size, minimum=1, maximum=_MAX_WIDTH)
        self.intermediate_size = _as_int("intermediate_size", intermediate_size, minimum=1, maximum=_MAX_WIDTH)
        self.num_hidden_layers = _as_int("num_hidden_layers", num_hidden_layers, minimum=1, maximum=_MAX_COUNT)
        self.num_attention_heads = _as_int("num_attention_heads", num_attention_heads, minimum=1, maximum=_MAX_COUNT)
        kv_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.num_key_value_heads = _as_int("num_key_value_heads", kv_heads, minimum=1, maximum=_MAX_COUNT)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_key_value_heads})."
            )
        self.head_dim = _as_int(
            "head_dim", head_dim if head_dim is not None else self.hidden_size // self.num_attention_heads, minimum=1,
            maximum=_MAX_COUNT,
        )
        if self.head_dim % 2:
            raise ValueError(
                f"head_dim must be even for rotary embeddings, got {self.head_dim} "
                f"(hidden_size={self.hidden_size} / num_attention_heads={self.num_attention_heads} when not given)."
            )
        self.hidden_act = hidden_act
        self.max_position_embeddings = _as_int("max_position_embeddings", max_position_embeddings, minimum=1)
        self.initializer_range = float(initializer_range)
        self.rms_norm_eps = float(rms_norm_eps)
        self.rope_parameters = _rope_parameters(rope_parameters, rope_theta, rope_scaling)
        self.attention_bias = bool(attention_bias)
        self.attention_dropout = float(attention_dropout)

        self.use_sliding_window = bool(use_sliding_window)
        self.sliding_window = None if sliding_window is None else _as_int("sliding_window", sliding_window, minimum=1)
        # Qwen3Config (which vLLM/SGLang parse this file with) requires an int here.
        self.max_window_layers = self.num_hidden_layers if max_window_layers is None else max_window_layers
        self.layer_types = _layer_types(layer_types, self.num_hidden_layers, self)

        self.block_size = _as_int("block_size", block_size, minimum=2, maximum=_MAX_COUNT)
        if num_speculative_tokens is not None:  # absent: kept out of config.json (z-lab's format has no such key)
            drafts = _as_int("num_speculative_tokens", num_speculative_tokens)
            if not 1 <= drafts < self.block_size:
                raise ValueError(
                    f"num_speculative_tokens must be from 1 to block_size - 1 = {self.block_size - 1} (the drafts one "
                    f"block holds), got {drafts}; remove it from config.json to verify every draft."
                )
            self.num_speculative_tokens = drafts
        if draft_vocab is not None:  # absent: kept out of config.json
            self.draft_vocab = _draft_vocab(draft_vocab, self.vocab_size)
        if not isinstance(dflash_config, (dict, type(None))):
            raise ValueError(f"dflash_config must be a mapping, got {type(dflash_config).__name__}.")
        nested = dict(dflash_config or {})
        _refuse_unsupported_options(nested)
        is_causal = nested.get("is_causal", is_causal)
        if is_causal is not None and not isinstance(is_causal, bool):
            raise ValueError(f"is_causal must be true, false or absent, got {is_causal!r}.")
        if is_causal is not None:  # absent (the class default, None): z-lab's per-layer rule; a bool: every layer
            self.is_causal = is_causal
        mask = nested.get("mask_token_id", mask_token_id)
        taps = nested.get("target_layer_ids", target_layer_ids)
        self.num_target_layers = None if num_target_layers is None else _as_int(
            "num_target_layers", num_target_layers, minimum=1
        )
        if taps is None and self.num_target_layers is not None:
            taps = default_target_layer_ids(self.num_target_layers, 1)
        if taps is None:
            # Unknown taps: legal for the argument-free config transformers builds to diff against, refused by
            # DFlashDraftModel (see ``require_target_layer_ids``).
            self.target_layer_ids = None
        else:
            if not isinstance(taps, (list, tuple)) or not taps:
                raise ValueError(f"target_layer_ids must be a non-empty list of layer indices, got {taps!r}.")
            self.target_layer_ids = [_as_int("target_layer_ids[]", t, minimum=0) for t in taps]
            repeated = sorted({t for t in self.target_layer_ids if self.target_layer_ids.count(t) > 1})
            if repeated:
                raise ValueError(
                    f"target_layer_ids {self.target_layer_ids} taps layer(s) {repeated} more than once; each tap "
                    "must be a different target layer. Remove the repeats (the drafter's fc width is "
                    "len(target_layer_ids) x target hidden size)."
                )
            if self.num_target_layers is not None and max(self.target_layer_ids) >= self.num_target_layers:
                raise ValueError(
                    f"target_layer_ids {self.target_layer_ids} reach beyond num_target_layers={self.num_target_layers}."
                )
        self.mask_token_id = None if mask is None else _as_int("mask_token_id", mask, minimum=0)
        if self.mask_token_id is not None and self.mask_token_id >= self.vocab_size:
            raise ValueError(
                f"mask_token_id {self.mask_token_id} is outside the vocabulary (vocab_size={self.vocab_size})."
            )
        self.dflash_config = {"mask_token_id": self.mask_token_id, "target_layer_ids": self.target_layer_ids}
        self.target_hidden_size = _as_int(
            "target_hidden_size", target_hidden_size if target_hidden_size is not None else self.hidden_size, minimum=1,
            maximum=_MAX_WIDTH,
        )
        kwargs.setdefault("architectures", ["DFlashDraftModel"])
        with config_errors_as_value_errors("The drafter config is invalid"):
            super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def num_taps(self) -> int:
        return len(self.require_target_layer_ids())

    def require_target_layer_ids(self) -> list[int]:
        if self.target_layer_ids is None:
            raise ValueError(
                "The drafter config names neither dflash_config.target_layer_ids nor num_target_layers, so the "
                "target layers to tap are unknown. Add one of them to config.json."
            )
        return self.target_layer_ids

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        # The flat mirrors are derived from dflash_config; storing both would let them disagree on disk.
        out.pop("mask_token_id", None)
        out.pop("target_layer_ids", None)
        return out


def _config_fields_of_tensor_dims(config: DFlashConfig) -> dict[str, tuple[str, ...]]:
    """For each drafter tensor (name without its ``layers.{i}.`` prefix), the config fields that size each of its
    dimensions, as they read in config.json."""
    hidden = f"hidden_size={config.hidden_size}"
    heads = f"num_attention_heads={config.num_attention_heads} × head_dim={config.head_dim}"
    kv_heads = f"num_key_value_heads={config.num_key_value_heads} × head_dim={config.head_dim}"
    head = f"head_dim={config.head_dim}"
    inner = f"intermediate_size={config.intermediate_size}"
    taps = (f"len(target_layer_ids)={len(config.target_layer_ids or [])} (target_layer_ids="
            f"{config.target_layer_ids}) × target_hidden_size={config.target_hidden_size}")
    return {
        "fc.weight": (hidden, taps),
        "hidden_norm.weight": (hidden,), "norm.weight": (hidden,),
        "input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,),
        "self_attn.q_proj.weight": (heads, hidden), "self_attn.q_proj.bias": (heads,),
        "self_attn.k_proj.weight": (kv_heads, hidden), "self_attn.k_proj.bias": (kv_heads,),
        "self_attn.v_proj.weight": (kv_heads, hidden), "self_attn.v_proj.bias": (kv_heads,),
        "self_attn.o_proj.weight": (hidden, heads), "self_attn.o_proj.bias": (hidden,),
        "self_attn.q_norm.weight": (head,), "self_attn.k_norm.weight": (head,),
        "mlp.gate_proj.weight": (inner, hidden), "mlp.up_proj.weight": (inner, hidden),
        "mlp.down_proj.weight": (hidden, inner),
    }


def describe_config_weight_disagreement(config: DFlashConfig, mismatched: Any, source: str) -> str:
    """The error for a checkpoint whose tensors have other shapes than its config.json implies (an edited config,
    or weights of another drafter): which config field disagrees with which tensor's shape, and the ways out.

    ``mismatched``: (tensor name, shape in the checkpoint, shape the config gives) triples, as transformers'
    loading info lists them."""
    fields_of = _config_fields_of_tensor_dims(config)
    disagreements: dict[tuple[str, int], list[str]] = {}  # (field, size it gives) -> "tensor [shape]" entries
    for name, found, expected in sorted(mismatched, key=lambda entry: entry[0]):
        found, expected = list(found), list(expected)
        parts_of_name = name.split(".")
        if parts_of_name[0] == "layers" and len(parts_of_name) > 2 and parts_of_name[1].isdigit():
            parts_of_name = parts_of_name[2:]  # a decoder layer's tensor: its name without "layers.{i}."
        fields = fields_of.get(".".join(parts_of_name))
        if fields is None or len(fields) != len(found) or len(found) != len(expected):
            disagreements.setdefault((f"the model built from config.json (expects {expected})", -1), []).append(
                f"{name} {found}")
            continue
        for dim, (field, size, want) in enumerate(zip(fields, found, expected)):
            if size != want:
                disagreements.setdefault((field, want), []).append(f"{name} {found} (dim {dim} is {size})")
    parts = []
    for (field, want), tensors in disagreements.items():
        listed = ", ".join(tensors[:3]) + (f" and {len(tensors) - 3} more" if len(tensors) > 3 else "")
        gives = "" if want < 0 or field.endswith(f"={want}") else f" gives {want}"
        parts.append(f"{field}{gives}, but the checkpoint has {listed}")
    return (
        f"The drafter's config.json in {source} disagrees with its weights: " + "; ".join(parts) + ". The weights "
        "are readable, they were made for other settings: put the values the checkpoint was made with back into "
        "config.json (or re-export the drafter), or pair this config with the weights it was written for."
    )


# Plausibility bounds: far above any real model, low enough that weight shapes cannot overflow int64.
_MAX_WIDTH = 2**20
_MAX_COUNT = 2**12
_MAX_VOCAB = 2**24


def _draft_vocab(ids: Any, vocab_size: int) -> list[int]:
    if not isinstance(ids, (list, tuple)) or not ids:
        raise ValueError(f"draft_vocab must be a non-empty list of token ids, got {type(ids).__name__}.")
    ids = [_as_int("draft_vocab[]", t, minimum=0) for t in ids]
    if ids[-1] >= vocab_size:
        raise ValueError(f"draft_vocab holds token id {ids[-1]}, outside the vocabulary (vocab_size={vocab_size}).")
    if any(a >= b for a, b in zip(ids, ids[1:])):
        raise ValueError("draft_vocab must list distinct token ids in increasing order; sort it and drop repeats.")
    return ids


def _as_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__}).")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}.")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name}={value} is implausibly large (at most {maximum}); check config.json.")
    return value


def _rope_parameters(rope_parameters: Any, rope_theta: Any, rope_scaling: Any) -> dict:
    """Merge the 4.x (``rope_theta`` + ``rope_scaling``) and 5.x (``rope_parameters``) spellings."""
    params: dict = {}
    if rope_scaling is not None:
        if not isinstance(rope_scaling, dict):
            raise ValueError(f"rope_scaling must be a mapping or null, got {rope_scaling!r}.")
        params.update(rope_scaling)
    if rope_parameters is not None:
        if not isinstance(rope_parameters, dict):
            raise ValueError(f"rope_parameters must be a mapping or null, got {rope_parameters!r}.")
        params.update(rope_parameters)
    if rope_theta is not None:
        params.setdefault("rope_theta", rope_theta)
    params.setdefault("rope_theta", 1_000_000.0)
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    params.setdefault("rope_type", "default")
    if params["rope_type"] not in ("default", "linear"):
        raise ValueError(
            f"rope_type {params['rope_type']!r} is not supported by the DFlash drafter (supported: default, linear)."
        )
    if params["rope_type"] == "linear":
        factor = params.get("factor")
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
            raise ValueError(f"Linear RoPE scaling needs a positive numeric factor, got {factor!r}.")
    try:
        params["rope_theta"] = float(params["rope_theta"])
    except (TypeError, ValueError):
        raise ValueError(f"rope_theta must be a number, got {params['rope_theta']!r}.") from None
    if not math.isfinite(params["rope_theta"]) or params["rope_theta"] <= 0:
        raise ValueError(f"rope_theta must be a positive finite number, got {params['rope_theta']!r}.")
    return params


# dflash_config options of newer z-lab drafters that change what the drafter computes, with their neutral value.
_NEUTRAL_OPTIONS = {"input_embedding_scale": 1.0, "output_multiplier": 1.0, "final_logit_softcapping": None}


def _refuse_unsupported_options(nested: dict) -> None:
    used = {k: nested[k] for k in _NEUTRAL_OPTIONS if k in nested and nested[k] != _NEUTRAL_OPTIONS[k]}
    if used:
        raise ValueError(
            f"This drafter's dflash_config sets {used}, which dflash-hf does not implement yet; running without them "
            "would draft from a different model. Use a drafter without these options, or remove them only if "
            "they were set by mistake."
        )


def _layer_types(layer_types: Any, num_layers: int, config: DFlashConfig) -> list[str]:
    if layer_types is None:
        window_from = config.max_window_layers
        sliding = config.use_sliding_window and config.sliding_window is not None
        return ["sliding_attention" if sliding and i >= window_from else "full_attention" for i in range(num_layers)]
    if not isinstance(layer_types, (list, tuple)) or len(layer_types) != num_layers:
        raise ValueError(
            f"layer_types must list one entry per drafter layer ({num_layers}), got {layer_types!r}."
        )
    bad = [t for t in layer_types if t not in _LAYER_TYPES]
    if bad:
        raise ValueError(f"Unknown layer_types {bad}; each entry must be one of {_LAYER_TYPES}.")
    if "sliding_attention" in layer_types and config.sliding_window is None:
        raise ValueError("layer_types asks for sliding_attention layers but sliding_window is not set.")
    return list(layer_types)


__all__ = ["DFlashConfig", "default_target_layer_ids", "describe_config_weight_disagreement"]

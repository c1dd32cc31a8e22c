"""Every difference between the transformers releases we support (5.15 … 5.x), in one place.

Portable core: imports only torch, transformers and siblings; copied into every published drafter.

What differs across the range:
- the cache keyword: ``past_key_values`` up to 5.23, ``cache`` from 5.24 (in generate's model_kwargs, in model
  forwards, in model outputs and in generate's output dataclasses);
- decoder layers return a tensor in recent releases and a tuple in older ones;
- the private ``GenerationMixin`` methods the generate patch wraps (``PATCHED_SIGNATURES``): how they receive the
  generation config and the assistant, and the ``_is_stateful`` flag that refuses assisted decoding on hybrids;
- huggingface_hub's strict config dataclasses (from 5.2x) raise their own exception types;
- from 5.25 transformers' own assisted loop takes hybrid (linear-attention) targets, and their cache layers count
  the tokens they have seen in a tensor that a state rollback must put back too.

``Cache.crop(-n)`` (n > 0) is the one crop call that means the same everywhere; cache_dflash only uses that.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
from typing import Any, Iterator

import torch
import transformers

TRANSFORMERS_VERSION = tuple(int(p) for p in transformers.__version__.split(".")[:2] if p.isdigit())


# transformers.generation is imported on first use only: dflash_hf installs its generate patch as that module
# finishes loading, which must not find this module half-initialised.
@functools.cache
def _generate_output_fields() -> tuple[type, frozenset]:
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    return GenerateDecoderOnlyOutput, frozenset(f.name for f in dataclasses.fields(GenerateDecoderOnlyOutput))


def generate_output_cache_field() -> str:
    """The field of generate's output that holds the cache: ``cache`` from 5.24, ``past_key_values`` before."""
    return "cache" if "cache" in _generate_output_fields()[1] else "past_key_values"


def cache_from_model_kwargs(model_kwargs: dict) -> Any:
    cache = model_kwargs.get("cache")
    return cache if cache is not None else model_kwargs.get("past_key_values")


def forward_cache_kwarg(model: torch.nn.Module) -> str:
    """Name under which ``model.forward`` takes its KV cache."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def layer_output_hidden(output: Any) -> torch.Tensor:
    """The hidden states a decoder layer returned (a tensor, or the first item of a tuple)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def make_generate_output(sequences: torch.Tensor, cache: Any, **fields: Any) -> Any:
    """A ``GenerateDecoderOnlyOutput`` with the fields this release has (the cache under its name)."""
    output_class, names = _generate_output_fields()
    kwargs = {k: v for k, v in fields.items() if k in names}
    kwargs[generate_output_cache_field()] = cache
    return output_class(sequences=sequences, **kwargs)


def cache_from_output(output: Any) -> Any:
    """The cache a model forward returned (``output.cache`` from 5.24, ``output.past_key_values`` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


# The private GenerationMixin methods install_generate_patch wraps, with the parameters it reads, in order.
PATCHED_SIGNATURES = {
    "_validate_generation_mode": ("self", "generation_mode", "generation_config", "generation_mode_kwargs"),
    "_get_candidate_generator": ("self", "generation_config"),
    "_assisted_decoding": ("self", "input_ids", "logits_processor", "stopping_criteria", "generation_config"),
}


def patched_signature_problems() -> list[str]:
    """How this transformers release's private generate methods differ from what the patch expects."""
    from transformers.generation.utils import GenerationMixin

    problems = []
    for name, expected in PATCHED_SIGNATURES.items():
        method = getattr(GenerationMixin, name, None)
        if method is None:
            problems.append(f"GenerationMixin.{name} no longer exists")
            continue
        method = inspect.unwrap(method)
        params = tuple(inspect.signature(method).parameters)
        if params[: len(expected)] != expected:
            problems.append(f"GenerationMixin.{name}{params} no longer starts with {expected}")
    return problems


def assistant_from_validate_args(args: tuple, kwargs: dict) -> Any:
    """The assistant model inside ``_validate_generation_mode(generation_mode, generation_config, kwargs)``."""
    gen_kwargs = kwargs.get("generation_mode_kwargs")
    if gen_kwargs is None and len(args) >= 3:
        gen_kwargs = args[2]
    return (gen_kwargs or {}).get("assistant_model")


def generation_config_from_validate_args(args: tuple, kwargs: dict) -> Any:
    return args[1] if len(args) > 1 else kwargs.get("generation_config")


@functools.cache
def stock_loop_refuses_stateful() -> bool:
    """Whether transformers' generate refuses assisted decoding on stateful (hybrid) models: up to 5.24 it does;
    from 5.25 its own loop records linear-attention states and rolls them back, so it takes hybrids."""
    from transformers.generation.utils import GenerationMixin

    return "_is_stateful" in inspect.getsource(GenerationMixin._validate_generation_mode)


def linear_layer_token_count(layer: Any) -> torch.Tensor | None:
    """A linear-attention cache layer's count of tokens seen (``cumulative_length_linear``, a tensor the hybrid
    cache's ``get_seq_length`` reads, from 5.25), to save and restore with its states; None before 5.25."""
    count = getattr(layer, "cumulative_length_linear", None)
    return count if isinstance(count, torch.Tensor) else None


@contextlib.contextmanager
def stateful_check_lifted(model: Any) -> Iterator[None]:
    """transformers refuses assisted decoding on stateful (hybrid) models because its own loop cannot roll their
    states back; DFlash's loop can. An instance attribute shadows the class flag for the duration only."""
    model._is_stateful = False
    try:
        yield
    finally:
        del model._is_stateful



@contextlib.contextmanager
def config_errors_as_value_errors(what: str) -> Iterator[None]:
    """transformers >= 5.2x validates configs with huggingface_hub strict dataclasses, whose errors are not
    ValueErrors; report every invalid config the same way on every release."""
    try:
        yield
    except Exception as error:
        if type(error).__module__.startswith("huggingface_hub"):
            raise ValueError(f"{what}: {error}") from error
        raise


__all__ = [
    "PATCHED_SIGNATURES",
    "TRANSFORMERS_VERSION",
    "assistant_from_validate_args",
    "cache_from_model_kwargs",
    "cache_from_output",
    "config_errors_as_value_errors",
    "forward_cache_kwarg",
    "generate_output_cache_field",
    "generation_config_from_validate_args",
    "layer_output_hidden",
    "make_generate_output",
    "patched_signature_problems",
    "linear_layer_token_count",
    "stateful_check_lifted",
    "stock_loop_refuses_stateful",
]

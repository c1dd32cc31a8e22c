"""What a target and a DFlash drafter must agree on, the drafter's options for one generate call, and the taps
that read the target's hidden states.

Portable core: imports only torch, transformers and sibling modules; copied into every published drafter.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .lookup_dflash import DEFAULT_MAX_NGRAM, check_prompt_lookup
from .schedule_dflash import AcceptanceProfile, DraftSchedule, VerifyCosts
from .transformers_compat import layer_output_hidden
from .verify_dflash import SAMPLING_MODES

# Attention-only families, whose KV cache crops exactly, and hybrids with Gated-DeltaNet linear attention, whose
# conv/recurrent states are rolled back by snapshot and re-run (see run_dflash_decoding).
SUPPORTED_TARGET_TYPES = (
    "llama", "qwen2", "qwen3", "qwen3_moe",
    "qwen3_next", "qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text",
)
MAX_BLOCK_SIZE = 128


# ------------------------------------------------------------------------------------------------------------------
# Target introspection and pair validation
# ------------------------------------------------------------------------------------------------------------------
def target_text_config(target: nn.Module) -> Any:
    config = target.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def target_decoder_layers(target: nn.Module) -> nn.ModuleList:
    """The decoder layer list of a causal LM (also inside ``…ForConditionalGeneration`` wrappers)."""
    candidates = [target]
    for attr in ("model", "language_model", "transformer"):
        for module in list(candidates):
            child = getattr(module, attr, None)
            if isinstance(child, nn.Module):
                candidates.append(child)
    for module in reversed(candidates):
        layers = getattr(module, "layers", None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ValueError(
        f"Could not find the decoder layers of {type(target).__name__} (looked for `.model.layers`, "
        "`.model.language_model.layers`). DFlash needs them to tap hidden states."
    )


def check_target_family(target: nn.Module) -> Any:
    """The target's text config; a ValueError naming the family when DFlash cannot serve it."""
    tcfg = target_text_config(target)
    model_type = getattr(tcfg, "model_type", None)
    if model_type not in SUPPORTED_TARGET_TYPES:
        raise ValueError(
            f"DFlash does not support target model_type {model_type!r} ({type(target).__name__}) yet (supported: "
            f"{', '.join(SUPPORTED_TARGET_TYPES)}). Use plain `generate` for this model."
        )
    return tcfg


def validate_pair(target: nn.Module, drafter: nn.Module) -> None:
    """Raise a ValueError that says what to fix when ``drafter`` cannot serve ``target``."""
    cfg = drafter.config
    tcfg = check_target_family(target)
    if not 2 <= cfg.block_size <= MAX_BLOCK_SIZE:
        raise ValueError(
            f"Drafter block_size={cfg.block_size} is outside 2…{MAX_BLOCK_SIZE}; DFlash drafters are trained with "
            "blocks of 8–16 tokens. Fix `block_size` in the drafter's config.json."
        )
    num_layers = tcfg.num_hidden_layers
    bad_taps = [i for i in cfg.target_layer_ids if not 0 <= i < num_layers]
    if bad_taps:
        raise ValueError(
            f"Drafter taps target layers {cfg.target_layer_ids}, but the target has only {num_layers} decoder layers "
            f"(ids {bad_taps} do not exist). This drafter was built for a different target; load the drafter "
            "trained for this model or build one with DFlashDraftModel.from_target(target)."
        )
    fc_in = drafter.fc.in_features
    expected = len(cfg.target_layer_ids) * tcfg.hidden_size
    if fc_in != expected:
        raise ValueError(
            f"Drafter fc expects {fc_in} input features but {len(cfg.target_layer_ids)} taps × target hidden size "
            f"{tcfg.hidden_size} = {expected}. The drafter was trained for a target with hidden size "
            f"{fc_in // max(1, len(cfg.target_layer_ids))}; use a drafter made for this target."
        )
    embed = target.get_input_embeddings()
    vocab_rows = embed.weight.shape[0] if hasattr(embed, "weight") else tcfg.vocab_size
    embed_dim = embed.weight.shape[1] if hasattr(embed, "weight") else tcfg.hidden_size
    if cfg.mask_token_id is None:
        raise ValueError(
            "The drafter config has no mask_token_id (dflash_config.mask_token_id); set it to the row of the "
            "target's embedding the drafter was trained with."
        )
    if not 0 <= cfg.mask_token_id < vocab_rows:
        raise ValueError(
            f"Drafter mask_token_id={cfg.mask_token_id} is not a row of the target's embedding table "
            f"({vocab_rows} rows). The drafter was trained for another vocabulary; use a matching drafter."
        )
    if cfg.hidden_size != embed_dim:
        raise ValueError(
            f"Drafter hidden_size={cfg.hidden_size} differs from the target embedding width {embed_dim}: the drafter "
            "reads the target's embeddings and feeds the target's LM head, so they must match."
        )
    drafter_vocab = getattr(cfg, "vocab_size", None)
    if drafter_vocab is not None and drafter_vocab != tcfg.vocab_size:
        raise ValueError(
            f"The drafter was built for a vocabulary of {drafter_vocab} tokens but the target has {tcfg.vocab_size} "
            "(config vocab_size). A DFlash drafter drafts with its target's own embedding, LM head and tokenizer; "
            "use the drafter trained for this target, or build one with DFlashDraftModel.from_target(target)."
        )


def max_drafts_per_step(drafter: nn.Module) -> int:
    """Drafts verified per step: ``drafter.num_speculative_tokens`` (1 … block_size - 1), else block_size - 1
    (also the most a step may verify when the number is chosen by cost, ``"auto"``)."""
    most = drafter.config.block_size - 1
    wanted = getattr(drafter, "num_speculative_tokens", None)
    if wanted is None or wanted == "auto":
        return most
    if isinstance(wanted, bool) or not isinstance(wanted, int) or not 1 <= wanted <= most:
        raise ValueError(
            f"drafter.num_speculative_tokens must be an int from 1 to block_size - 1 = {most}, None for all, or "
            f"'auto' to choose per step by this machine's measured costs; got {wanted!r}."
        )
    return wanted


def draft_schedule(drafter: nn.Module, options: "DFlashOptions") -> DraftSchedule | None:
    """The per-step choice of drafts when ``num_speculative_tokens == "auto"`` (None: every step verifies
    ``options.max_drafts``). Needs ``drafter.verify_costs``, this machine's ``VerifyCosts`` for the target."""
    if not options.drafts_by_cost:
        return None
    costs = getattr(drafter, "verify_costs", None)
    if not isinstance(costs, VerifyCosts):
        raise ValueError(
            "drafter.num_speculative_tokens = 'auto' chooses the drafts of each step by what verifying them costs "
            "here, but drafter.verify_costs is not set: measure them once with "
            "dflash_hf.measure_verify_costs(target, drafter) (the dflash-hf commands do, and cache them), or set "
            "num_speculative_tokens to a number."
        )
    profile = getattr(drafter, "acceptance_profile", None)
    if not isinstance(profile, AcceptanceProfile) or profile.slots != options.max_drafts:
        profile = drafter.acceptance_profile = AcceptanceProfile(options.max_drafts)  # kept across calls
    return DraftSchedule(costs, profile, options.max_drafts)


GENERATION_LOOPS = ("dflash", "transformers")


@dataclass(frozen=True)
class DFlashOptions:
    """The drafter's user-settable attributes, read and checked once per generate call.

    ``getattr`` defaults keep drafters of older copies of this module (remote code saved before an option
    existed) working.
    """

    generation_loop: str
    sampling_mode: str
    max_drafts: int
    few_row_matmul_on_cpu: bool | str
    drafts_by_cost: bool = False  # num_speculative_tokens == "auto": each step's drafts chosen by draft_schedule
    # drafter.prompt_lookup_num_tokens: each step may verify an n-gram continuation from the row's own sequence
    # instead of the drafter's block (lookup_dflash); generate(prompt_lookup_num_tokens=...) overrides it per call.
    prompt_lookup_num_tokens: int | None = None
    prompt_lookup_max_ngram: int = DEFAULT_MAX_NGRAM

    @classmethod
    def from_drafter(cls, drafter: nn.Module) -> "DFlashOptions":
        loop = getattr(drafter, "generation_loop", "dflash")
        if loop not in GENERATION_LOOPS:
            raise ValueError(
                f"drafter.generation_loop must be one of {GENERATION_LOOPS}, got {loop!r}: 'dflash' is our loop "
                "(the default), 'transformers' drives DFlashCandidateGenerator from transformers' assisted loop."
            )
        mode = getattr(drafter, "sampling_mode", "auto")
        if mode not in SAMPLING_MODES:
            raise ValueError(f"drafter.sampling_mode must be 'auto', 'strict' or 'ratio', got {mode!r}.")
        few_rows = getattr(drafter, "few_row_matmul_on_cpu", True)
        if not (few_rows is True or few_rows is False or few_rows == "always"):
            raise ValueError(f"drafter.few_row_matmul_on_cpu must be True (the routine where this machine's "
                             f"timings favour it), 'always' or False, got {few_rows!r}.")
        by_cost = getattr(drafter, "num_speculative_tokens", None) == "auto"
        if by_cost and loop != "dflash":
            raise ValueError("num_speculative_tokens = 'auto' needs generation_loop = 'dflash' (transformers' "
                             "assisted loop verifies a fixed number of drafts); set a number for that loop.")
        lookup = getattr(drafter, "prompt_lookup_num_tokens", None)
        ngram = getattr(drafter, "prompt_lookup_max_ngram", DEFAULT_MAX_NGRAM)
        check_prompt_lookup(lookup, ngram, "drafter.prompt_lookup_num_tokens", "drafter.prompt_lookup_max_ngram")
        if lookup is not None and loop != "dflash":
            raise ValueError("drafter.prompt_lookup_num_tokens needs generation_loop = 'dflash': transformers' "
                             "assisted loop takes one kind of proposal per call. Set it to None for that loop.")
        return cls(loop, mode, max_drafts_per_step(drafter), few_rows, by_cost, lookup, ngram)


# ------------------------------------------------------------------------------------------------------------------
# Taps: forward hooks on exactly the tapped decoder layers
# ------------------------------------------------------------------------------------------------------------------
class TapRecorder:
    """Captures the outputs of ``layer_ids`` decoder layers on every target forward of its own thread.

    ``take()`` returns them concatenated on the feature axis: [B, T, K * hidden], in ``layer_ids`` order, on
    ``device``. Hooks are removed on exit, also when generation raises. Forwards that other threads run on the
    same target (a service answering two requests at once) pass through the hooks unrecorded: the hooks belong
    to the module, the recording to the generate call that opened it.
    """

    def __init__(self, target: nn.Module, layer_ids: list[int], device: torch.device) -> None:
        self.layers = target_decoder_layers(target)
        self.layer_ids = list(layer_ids)
        self.device = device
        self._captured: dict[int, torch.Tensor] = {}
        self._handles: list = []
        self._thread = threading.get_ident()

    def __enter__(self) -> "TapRecorder":
        for idx in self.layer_ids:
            self._handles.append(self.layers[idx].register_forward_hook(functools.partial(self._record, idx)))
        return self

    def _record(self, idx: int, module: nn.Module, args: Any, output: Any) -> None:
        if threading.get_ident() == self._thread:
            self._captured[idx] = layer_output_hidden(output).detach()

    def take(self) -> torch.Tensor:
        missing = [i for i in self.layer_ids if i not in self._captured]
        if missing:
            raise RuntimeError(f"Target layers {missing} did not run during the last forward; cannot tap them.")
        taps = torch.cat([self._captured.pop(i).to(self.device) for i in self.layer_ids], dim=-1)
        return taps

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._captured.clear()

    def __exit__(self, *exc: Any) -> None:
        self.close()


__all__ = ["GENERATION_LOOPS", "MAX_BLOCK_SIZE", "SUPPORTED_TARGET_TYPES", "DFlashOptions", "TapRecorder",
           "check_target_family", "draft_schedule", "max_drafts_per_step", "target_decoder_layers",
           "target_text_config", "validate_pair"]

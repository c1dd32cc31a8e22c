"""DFlash decoding inside ``target.generate(..., assistant_model=drafter)``.

Portable core: imports only torch, transformers and sibling modules; copied into every published drafter.

One verify step, with ``start`` = tokens the target has processed (its cache length):
1. the token at ``start`` (committed last step, not yet processed) opens the block ``[token, MASK × (B-1)]``;
2. ONE drafter forward drafts the B-1 masked slots, attending to the context features of every committed position
   (a persistent draft cache holds them; the block's own entries are never kept);
3. ONE target forward over ``[token, drafts]`` verifies them while forward hooks capture the tapped layers; the
   accepted drafts plus one target token are committed and the target cache is cropped to the committed length.
   The taps of the committed positions are the next step's new context: no extra target pass.

``install_generate_patch`` makes plain ``generate`` dispatch here when the assistant carries the duck-typed
``is_dflash_drafter`` marker; every other assistant and plain generate run transformers' code untouched.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from transformers.generation.candidate_generator import CandidateGenerator
from transformers.generation.utils import GenerationMixin
from transformers.utils import logging

from .transformers_compat import (
    LinearStateSnapshot,
    activate_past_recording,
    cache_from_model_kwargs,
    crop_cache,
    forward_cache_kwarg,
    gather_cache_slots,
    has_linear_attention,
    layer_output_hidden,
    make_generate_output,
    ragged_batch_problem,
    select_cache_rows,
)

# Attention-only families, whose KV cache crops exactly, and hybrids with Gated-DeltaNet linear attention, whose
# conv/recurrent states are rolled back by snapshot and re-run (see run_dflash_decoding).
logger = logging.get_logger(__name__)

SUPPORTED_TARGET_TYPES = (
    "llama", "qwen2", "qwen3", "qwen3_moe",
    "qwen3_next", "qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text",
)
MAX_BLOCK_SIZE = 128


@dataclass
class DFlashStats:
    """Statistics of one generate call (``drafter.last_stats``).

    ``acceptance_lengths`` has one entry per verify step: drafts accepted + 1 (the target's own token).
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


def validate_pair(target: nn.Module, drafter: nn.Module) -> None:
    """Raise a ValueError that says what to fix when ``drafter`` cannot serve ``target``."""
    cfg = drafter.config
    tcfg = target_text_config(target)
    model_type = getattr(tcfg, "model_type", None)
    if model_type not in SUPPORTED_TARGET_TYPES:
        raise ValueError(
            f"DFlash does not support target model_type {model_type!r} yet (supported: "
            f"{', '.join(SUPPORTED_TARGET_TYPES)}). Use plain `generate` for this model."
        )
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
    drafter_vocab = getattr(cfg, "vocab_size", None)
    if drafter_vocab is not None and drafter_vocab != tcfg.vocab_size:
        raise ValueError(
            f"The drafter was built for a vocabulary of {drafter_vocab} tokens but the target has {tcfg.vocab_size} "
            "(config vocab_size). A DFlash drafter drafts with its target's own embedding, LM head and tokenizer; "
            "use the drafter trained for this target, or build one with DFlashDraftModel.from_target(target)."
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


def max_drafts_per_step(drafter: nn.Module) -> int:
    """Drafts verified per step: ``drafter.num_speculative_tokens`` (1 … block_size - 1), else block_size - 1."""
    most = drafter.config.block_size - 1
    wanted = getattr(drafter, "num_speculative_tokens", None)
    if wanted is None:
        return most
    if isinstance(wanted, bool) or not isinstance(wanted, int) or not 1 <= wanted <= most:
        raise ValueError(
            f"drafter.num_speculative_tokens must be an int from 1 to block_size - 1 = {most} (or None for all), "
            f"got {wanted!r}."
        )
    return wanted


GENERATION_LOOPS = ("dflash", "transformers")
SAMPLING_MODES = ("auto", "strict", "ratio")


@dataclass(frozen=True)
class DFlashOptions:
    """The drafter's user-settable attributes, read and checked once per generate call.

    ``getattr`` defaults keep drafters of older copies of this module (remote code saved before an option
    existed) working.
    """

    generation_loop: str
    sampling_mode: str
    max_drafts: int
    few_row_matmul_on_cpu: bool

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
            raise ValueError(f"drafter.sampling_mode must be one of {SAMPLING_MODES}, got {mode!r}.")
        few_rows = getattr(drafter, "few_row_matmul_on_cpu", True)
        if not isinstance(few_rows, bool):
            raise ValueError(f"drafter.few_row_matmul_on_cpu must be True or False, got {few_rows!r}.")
        return cls(loop, mode, max_drafts_per_step(drafter), few_rows)


def is_dflash_drafter(model: Any) -> bool:
    return bool(getattr(model, "is_dflash_drafter", False)) and callable(getattr(model, "_dflash_decode", None))


def _looks_like_untrusted_dflash_checkpoint(model: Any) -> bool:
    config = getattr(model, "config", None)
    return config is not None and isinstance(getattr(config, "dflash_config", None), dict) and not is_dflash_drafter(model)


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


# ------------------------------------------------------------------------------------------------------------------
# Drafting
# ------------------------------------------------------------------------------------------------------------------
class DraftSession:
    """The drafter's side of one generation: the draft cache and the target's shared embedding and LM head."""

    def __init__(self, target: nn.Module, drafter: nn.Module) -> None:
        from .modeling_dflash import DraftCache  # local: modeling imports this module

        self.drafter = drafter
        self.embed = target.get_input_embeddings()
        self.lm_head = target.get_output_embeddings()
        self.block_size = drafter.config.block_size
        self.mask_token_id = drafter.config.mask_token_id
        self.device = drafter.fc.weight.device
        self.cache = DraftCache()
        self.options = DFlashOptions.from_drafter(drafter)
        self.max_drafts = self.options.max_drafts

    @torch.no_grad()
    def propose(
        self,
        anchor: torch.Tensor,
        anchor_position: torch.Tensor,
        context_taps: torch.Tensor,
        context_positions: torch.Tensor,
    ) -> torch.Tensor:
        """Draft logits for the B-1 slots after ``anchor``.

        anchor: [R] token ids opening the block; anchor_position: [R] their positions.
        context_taps: [R, C, K*H] taps of committed positions not yet in the draft cache; context_positions: [R, C].
        Returns [R, n, V] logits from the target's LM head, n = ``max_drafts`` (B-1 unless the drafter's
        ``num_speculative_tokens`` asks for fewer).
        """
        rows = anchor.shape[0]
        block = torch.full((rows, self.block_size), self.mask_token_id, dtype=torch.long, device=anchor.device)
        block[:, 0] = anchor
        offsets = torch.arange(self.block_size, device=anchor_position.device)
        block_positions = anchor_position[:, None] + offsets  # [R, B]
        embeds = self.embed(block.to(self.embed.weight.device))
        head = self.draft_head()
        with few_row_linear(self.device, self.options.few_row_matmul_on_cpu):
            hidden = self.drafter(
                embeds.to(self.device),
                context_taps.to(self.device),
                block_positions.to(self.device),
                context_positions.to(self.device),
                cache=self.cache,
            )
            drafted = hidden[:, 1 : 1 + self.max_drafts]  # only the slots that will be verified go through the head
            return head(drafted.to(device=head.weight.device, dtype=head.weight.dtype))

    def draft_head(self) -> nn.Module:
        """The target's LM head, in the drafter's dtype when the two differ (e.g. a bfloat16 drafter of a float32
        target on CPU): drafts are only proposals, so their precision never changes the output. The cast copy is
        kept on the drafter and remade when the head's weights change."""
        head = self.lm_head
        dtype = self.drafter.fc.weight.dtype
        if type(head) is not nn.Linear or head.weight.dtype == dtype or not head.weight.is_floating_point():
            return head
        key = (head.weight.data_ptr(), head.weight._version, dtype, head.weight.device)
        cached = getattr(self.drafter, "_draft_head_cache", None)
        if cached is None or cached[0] != key:
            copy = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None,
                             device=head.weight.device, dtype=dtype).requires_grad_(False)
            copy.load_state_dict(head.state_dict())  # casts to ``dtype``
            cached = (key, copy)
            self.drafter._draft_head_cache = cached  # a plain attribute (a tuple): never saved, moved or trained
        return cached[1]


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


def keep_draft_context(cache: Any, session: DraftSession, pending: torch.Tensor, pending_positions: torch.Tensor) -> None:
    """Leave the drafter's context on the returned target cache, so that a generate continuing from that cache
    (the next turn of a chat) drafts with the whole conversation as context, not just the new turn."""
    setattr(cache, DRAFT_CONTEXT_ATTR, SavedDraftContext(
        _drafter_identity(session.drafter), session.cache, pending, pending_positions
    ))


def resume_draft_context(
    cache: Any, session: DraftSession, cached: int, context: torch.Tensor, context_positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Context for the first draft when the target cache already held ``cached`` prompt tokens.

    When an earlier DFlash generate of the same drafter left its context on the cache, the drafter gets it back
    (cut to the cached positions) and the call drafts as if it had seen the whole prompt. Otherwise (a cache
    filled by plain generate) the drafter sees only the uncached tokens: fewer drafts accepted in this call,
    the same output tokens — the target decides every one of them.
    """
    saved = getattr(cache, DRAFT_CONTEXT_ATTR, None)
    if saved is None or saved.owner != _drafter_identity(session.drafter):
        return context, context_positions
    covered = int(saved.pending_positions[0, -1]) + 1 if saved.pending_positions.numel() else saved.draft_cache.length()
    if covered < cached:  # the target cache grew after the drafter last saw it
        return context, context_positions
    session.cache = saved.draft_cache
    session.cache.drop_from(cached)
    keep = saved.pending_positions[0] < cached
    pending, pending_positions = saved.pending[:, keep], saved.pending_positions[:, keep]
    return (torch.cat((pending.to(context.device), context), dim=1),
            torch.cat((pending_positions.to(context_positions.device), context_positions), dim=1))


FEW_ROWS = range(2, 17)


def linear_for_few_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` computed as ``weight @ x^T``; x [..., in] with 2-16 rows -> [..., out].

    Why: CPU BLAS (MKL, 2 threads, float32) runs ``x @ weight^T`` for a handful of rows as a skinny GEMM far below
    memory bandwidth, and a single row as a matrix-vector product on one core. The transposed product streams the
    weight once on every core: 1536 x 576, 4 rows: 96 us instead of 322 us; 49152 x 576, 4 rows: 2.6 ms instead of
    12.5 ms (benchmarks/cpu_linear.py). The result differs only by float summation order.
    """
    rows = x.reshape(-1, x.shape[-1])
    if bias is None:
        out = torch.mm(weight, rows.T)  # [out, rows]
    else:
        out = torch.addmm(bias.unsqueeze(1), weight, rows.T)
    return out.T.contiguous().view(*x.shape[:-1], weight.shape[0])


class FewRowLinearMode(TorchFunctionMode):
    """Routes float32 CPU ``F.linear`` calls over 2-16 rows to :func:`linear_for_few_rows`; all else untouched.

    Active only around DFlash's own forwards (verify blocks and drafts), never around plain decoding.
    """

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        # Called for every torch op inside the forward: only F.linear is looked at.
        if func is torch.nn.functional.linear:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else (kwargs or {}).get("bias")
            if (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
                    and weight.dim() == 2 and x.numel() // max(x.shape[-1], 1) in FEW_ROWS):
                return linear_for_few_rows(x, weight, bias)
        return func(*args, **(kwargs or {}))


def few_row_linear(device: torch.device, enabled: bool = True) -> Any:
    """The context DFlash's own forwards run under on ``device``: :class:`FewRowLinearMode` on CPU when enabled
    (``drafter.few_row_matmul_on_cpu``), else nothing."""
    return FewRowLinearMode() if enabled and torch.device(device).type == "cpu" else contextlib.nullcontext()


# ------------------------------------------------------------------------------------------------------------------
# Verification
# ------------------------------------------------------------------------------------------------------------------
def _kernel_module() -> Any:
    """dflash_hf's fused kernels when the package is installed (never required by published drafters)."""
    try:
        return importlib.import_module("dflash_hf.kernels")
    except ImportError:
        return None


def process_block_scores(
    logits: torch.Tensor, sequence: torch.Tensor, drafts: torch.Tensor, logits_processor: Any
) -> torch.Tensor:
    """Apply generate's logits processors to every block slot exactly as plain generate would.

    logits: [1, n+1, V] target logits for slots 0…n; slot t is scored with ``sequence + drafts[:t]`` as input.
    Returns fp32 scores [1, n+1, V].
    """
    scores = logits.float()
    if not logits_processor:
        return scores
    candidate = torch.cat((sequence, drafts), dim=1)
    base = sequence.shape[1]
    processed = [logits_processor(candidate[:, : base + t], scores[:, t]) for t in range(scores.shape[1])]
    return torch.stack(processed, dim=1)


def process_draft_scores(
    draft_logits: torch.Tensor,
    sequence: torch.Tensor,
    logits_processor: Any,
    verifier: "BlockVerifier",
    first_position: int | None = None,
) -> torch.Tensor:
    """Ratio mode: the drafter's q gets the same processors as the target (temperature, top-k, …).

    draft_logits: [1, n, V]. Slot t's processors see ``sequence + drafts[:t]``, so with processors the drafts
    are sampled one slot at a time; returns fp32 scores [1, n, V] (the q the drafts were sampled from).
    ``first_position`` keys the first draft's randomness (default: ``sequence``'s length).
    """
    if first_position is None:
        first_position = sequence.shape[1]
    scores = draft_logits.float()
    if not logits_processor or scores.shape[1] == 0:
        return scores
    prefix, processed = sequence, []
    for t in range(scores.shape[1]):
        slot = logits_processor(prefix, scores[:, t])
        processed.append(slot)
        token = verifier.sample_drafts(slot[:, None], first_position + t)
        prefix = torch.cat((prefix, token), dim=1)
    return torch.stack(processed, dim=1)


class BatchProcessorView:
    """Runs generate's logits processors for the rows of a DFlash batch as plain batched ``generate`` runs them.

    Plain ``generate`` calls every processor on the whole batch, ``input_ids`` [N, L] with row ``b`` at index
    ``b``; processors may depend on that index (``prefix_allowed_tokens_fn(batch_id, …)``) or hold one entry per
    row (repetition penalty's per-row prompt length). DFlash rows advance by different amounts, so one call
    cannot hold every row at its own length. Instead each call holds all N rows at ONE length ℓ: the rows being
    scored at ℓ carry their real prefix, every other row a stand-in of that length (its own sequence cut to ℓ,
    or right-padded with the pad token as plain ``generate`` pads a finished row); the stand-ins' outputs are
    discarded. A call therefore scores every row whose block covers position ℓ at once.
    """

    def __init__(self, logits_processor: Any, num_rows: int, pad_token: Any) -> None:
        self.logits_processor = logits_processor
        self.num_rows = num_rows
        self.pad_token = 0 if pad_token is None else int(pad_token)

    def __bool__(self) -> bool:
        return bool(self.logits_processor)

    def score(self, requests: list[tuple[int, torch.Tensor, torch.Tensor]], stand_ins: list[torch.Tensor]) -> list:
        """requests: (batch row, prefix [ℓ], scores [V]); stand_ins: each batch row's longest known ids [L_b].
        Returns the processed fp32 scores [V] of every request, in order."""
        by_length: dict[int, list[int]] = {}
        for k, (_, prefix, _) in enumerate(requests):
            by_length.setdefault(prefix.shape[0], []).append(k)
        out: list = [None] * len(requests)
        for length, members in by_length.items():
            ids = torch.stack([self._stand_in(row, length) for row in stand_ins])  # [N, ℓ]
            scores = requests[members[0]][2].new_zeros(self.num_rows, requests[members[0]][2].shape[-1]).float()
            for k in members:
                row, prefix, row_scores = requests[k]
                ids[row] = prefix
                scores[row] = row_scores.float()
            processed = self.logits_processor(ids, scores)
            for k in members:
                out[k] = processed[requests[k][0]]
        return out

    def _stand_in(self, row_ids: torch.Tensor, length: int) -> torch.Tensor:
        if row_ids.shape[0] >= length:
            return row_ids[:length]
        return torch.cat((row_ids, row_ids.new_full((length - row_ids.shape[0],), self.pad_token)))


def _verify_portable(scores: torch.Tensor, drafts: torch.Tensor, do_sample: bool) -> tuple[int, torch.Tensor]:
    """Greedy or strict-sampling verification with plain torch ops (the path of published drafters when
    ``dflash_hf`` is not installed). scores: [1, n+1, V]; drafts: [1, n].

    Strict sampling draws every slot from the target (with the same global RNG as plain ``generate``) and
    accepts while the draw equals the draft, so each committed token is an exact sample of the target.
    """
    if do_sample:
        picks = torch.multinomial(torch.softmax(scores[0], dim=-1), num_samples=1).squeeze(-1)
    else:
        picks = scores[0].argmax(dim=-1)
    n = drafts.shape[1]
    accepted = int((picks[:n] == drafts[0]).int().cumprod(0).sum()) if n else 0
    return accepted, picks[accepted : accepted + 1]


class BlockVerifier:
    """Decides, per verify step, how many drafts the target accepts and which token it commits next.

    Modes: ``greedy``; ``strict`` (sample the target at each slot, accept while equal to the draft); ``ratio``
    (drafts sampled from the drafter's q, accepted with probability min(1, p/q), residual resampling).
    With ``dflash_hf`` installed the fused kernels run (Triton on CUDA, their torch reference elsewhere) with
    randomness keyed by (seed, position, token) — the seed is drawn once from torch's global RNG, so
    ``torch.manual_seed`` makes runs reproducible. Without it, greedy and strict run on plain torch ops.
    """

    def __init__(self, do_sample: bool, sampling_mode: str, device: torch.device) -> None:
        if sampling_mode not in ("auto", "strict", "ratio"):
            raise ValueError(f"drafter.sampling_mode must be 'auto', 'strict' or 'ratio', got {sampling_mode!r}.")
        self.kernels = _kernel_module()
        if sampling_mode == "auto":  # ratio accepts more (measured on the default pair) but needs the kernels
            sampling_mode = "ratio" if self.kernels is not None else "strict"
        self.mode = "greedy" if not do_sample else sampling_mode
        if self.mode == "ratio" and self.kernels is None:
            raise ValueError("sampling_mode='ratio' needs the dflash_hf package (pip install dflash-hf).")
        self.backend = "torch" if self.kernels is None else self.kernels.select_backend(device)
        self.seed = int(torch.randint(0, 2**31 - 1, (1,))) if do_sample and self.kernels is not None else None

    @property
    def samples_drafts(self) -> bool:
        return self.mode == "ratio"

    def sample_drafts(self, draft_scores: torch.Tensor, first_position: int) -> torch.Tensor:
        """Ratio mode: drafts [1, n] sampled from the drafter's processed scores [1, n, V]."""
        return self.sample_draft_rows(draft_scores, torch.tensor([first_position], device=draft_scores.device))

    def sample_draft_rows(self, draft_scores: torch.Tensor, first_positions: torch.Tensor) -> torch.Tensor:
        """Ratio mode, batched: drafts [R, n] from scores [R, n, V]; row r's slot t is keyed by position
        ``first_positions[r] + t``, so a row samples the same drafts whatever it is batched with."""
        return self.kernels.sample_keyed(draft_scores, self.seed, first_positions, backend=self.backend)

    def verify_rows(
        self,
        scores: torch.Tensor,
        drafts: torch.Tensor,
        num_drafts: torch.Tensor,
        first_positions: torch.Tensor,
        draft_scores: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Batched verification. scores: [R, n+1, V]; drafts: [R, n]; row r verifies only its first
        ``num_drafts[r]`` drafts; ``first_positions`` [R]: the position (real tokens before it) slot 0 decides.
        Returns (accepted [R], next token [R]).

        With the kernels, randomness is keyed by (seed, position, token) only: a row's samples do not depend on
        the other rows. The portable path draws from torch's global RNG row after row.
        """
        if self.kernels is None:
            results = [
                _verify_portable(scores[r : r + 1, : n + 1], drafts[r : r + 1, :n], self.mode != "greedy")
                for r, n in enumerate(num_drafts.tolist())
            ]
            accepted = torch.tensor([a for a, _ in results], device=scores.device)
            return accepted, torch.cat([token for _, token in results])
        if self.mode == "ratio" and draft_scores is None:
            draft_scores = scores[:, :0]
        accepted, next_token, _ = self.kernels.verify(
            self.mode, scores, drafts, num_drafts.to(scores.device), draft_logits=draft_scores, seed=self.seed,
            positions=first_positions.to(scores.device), backend=self.backend,
        )
        return accepted, next_token.view(-1)

    def __call__(
        self, scores: torch.Tensor, drafts: torch.Tensor, first_position: int, draft_scores: torch.Tensor | None = None
    ) -> tuple[int, torch.Tensor]:
        """scores: [1, n+1, V] processed target scores; drafts: [1, n]; ``first_position``: sequence index of
        the token slot 0 decides. Returns (accepted drafts, next token [1])."""
        if self.kernels is None:
            return _verify_portable(scores, drafts, self.mode != "greedy")
        num_drafts = torch.tensor([drafts.shape[1]], device=scores.device)
        positions = torch.tensor([first_position], device=scores.device)
        if self.mode == "ratio" and draft_scores is None:  # the prefill: no drafts, q is never read
            draft_scores = scores[:, :0]
        accepted, next_token, _ = self.kernels.verify(
            self.mode, scores, drafts, num_drafts, draft_logits=draft_scores, seed=self.seed,
            positions=positions, backend=self.backend,
        )
        return int(accepted[0]), next_token.view(1)


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


def _positions_from_mask(attention_mask: torch.Tensor | None, length: int, device: torch.device) -> torch.Tensor:
    """Rope positions [1, length] the way generate derives them (padding gets -1 here)."""
    if attention_mask is None:
        return torch.arange(length, device=device)[None]
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, -1)


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
    """DFlash decoding with the arguments generate hands to ``_assisted_decoding``."""
    for key in ("inputs_tensor", "assistant_model", "assistant_tokenizer", "tokenizer"):
        model_kwargs.pop(key, None)
    _check_request(target, generation_config, input_ids, synced_gpus, model_kwargs)
    validate_pair(target, drafter)
    options = DFlashOptions.from_drafter(drafter)
    if input_ids.shape[0] > 1:
        return run_batched_dflash_decoding(
            target, drafter, input_ids, logits_processor, stopping_criteria, generation_config, streamer,
            options=options, **model_kwargs
        )

    cache = cache_from_model_kwargs(model_kwargs)
    if cache is None:
        raise RuntimeError("generate did not prepare a KV cache; DFlash needs use_cache=True.")
    cached = prompt_tokens_in_cache(cache, input_ids)
    activate_past_recording(cache)
    snapshot = LinearStateSnapshot(cache) if has_linear_attention(cache) else None
    cache_kwarg = forward_cache_kwarg(target)
    attention_mask = model_kwargs.get("attention_mask")
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None
    do_sample = bool(generation_config.do_sample)
    verifier = BlockVerifier(do_sample, options.sampling_mode, input_ids.device)
    want_scores = generation_config.return_dict_in_generate and generation_config.output_scores
    want_logits = generation_config.return_dict_in_generate and generation_config.output_logits
    scores_out: list[torch.Tensor] = []
    logits_out: list[torch.Tensor] = []

    stats = DFlashStats(sampling=verifier.mode, block_size=drafter.config.block_size, verify_backend=verifier.backend)
    drafter.last_stats = stats
    session = DraftSession(target, drafter)
    device = input_ids.device
    positions = _positions_from_mask(attention_mask, input_ids.shape[1], device)

    def target_forward(
        tokens: torch.Tensor, token_positions: torch.Tensor, prefill: bool, start: int | None = None
    ) -> torch.Tensor:
        """tokens, token_positions: [1, T]; ``start``: sequence index of tokens[:, 0] (default: the uncached
        prompt for the prefill, the pending token for a verify step). The prefill keeps only the last logits."""
        mask = attention_mask
        if mask is not None:  # the prompt's mask, extended over every token processed since
            if start is None:
                start = cached if prefill else input_ids.shape[1] - 1
            mask = torch.cat((mask, mask.new_ones(1, start + tokens.shape[1] - mask.shape[1])), dim=1)
        kwargs = {cache_kwarg: cache, "use_cache": True, "attention_mask": mask, "position_ids": token_positions.clamp(min=0)}
        if prefill and target._supports_logits_to_keep():
            kwargs["logits_to_keep"] = 1
        stats.num_target_forwards += 1
        with few_row_linear(device, not prefill and options.few_row_matmul_on_cpu):
            return target(input_ids=tokens, **kwargs).logits

    def commit(tokens: torch.Tensor, step_scores: torch.Tensor, step_logits: torch.Tensor) -> bool:
        """Append tokens one at a time exactly as plain generate would; True once a stopping criterion fires."""
        nonlocal input_ids, positions
        for i in range(tokens.shape[0]):
            input_ids = torch.cat((input_ids, tokens[i].view(1, 1)), dim=1)
            positions = torch.cat((positions, positions[:, -1:] + 1), dim=1)
            stats.new_tokens += 1
            if want_scores:
                scores_out.append(step_scores[:, i])
            if want_logits:  # float32, as plain generate returns them whatever the model's dtype
                logits_out.append(step_logits[:, i].float())
            if bool(stopping_criteria(input_ids, step_scores[:, i]).any()):
                if streamer is not None:
                    streamer.put(tokens[: i + 1].cpu())
                return True
        if streamer is not None:
            streamer.put(tokens.cpu())
        return False

    with TapRecorder(target, drafter.config.target_layer_ids, session.device) as taps, torch.no_grad():
        t0 = time.perf_counter()
        # Only the prompt tokens the cache does not hold yet (all of them unless generate got a filled cache).
        logits = target_forward(input_ids[:, cached:], positions[:, cached:], prefill=True)[:, -1:]
        context, context_positions = taps.take(), positions[:, cached:]  # [1, P, K*H], [1, P]
        if cached:
            context, context_positions = resume_draft_context(cache, session, cached, context, context_positions)
        no_drafts = input_ids[:, :0]
        scores = process_block_scores(logits, input_ids, no_drafts, logits_processor)
        _, first_token = verifier(scores, no_drafts, input_ids.shape[1])
        stats.prefill_time_s = time.perf_counter() - t0
        done = commit(first_token, scores, logits)

        while not done:
            t0 = time.perf_counter()
            # Never draft past max_length: the last step may verify fewer than B-1 drafts.
            num_drafts = max(0, min(session.max_drafts, generation_config.max_length - input_ids.shape[1] - 1))
            draft_logits = session.propose(input_ids[:, -1], positions[:, -1], context, context_positions)
            draft_scores = None
            if verifier.samples_drafts:
                draft_scores = process_draft_scores(draft_logits[:, :num_drafts].to(device), input_ids,
                                                    logits_processor, verifier)
                drafts = verifier.sample_drafts(draft_scores, input_ids.shape[1])
            else:
                drafts = draft_logits[:, :num_drafts].argmax(dim=-1).to(device)  # [1, n]
            t1 = time.perf_counter()
            stats.draft_time_s += t1 - t0

            block = torch.cat((input_ids[:, -1:], drafts), dim=1)  # [1, n+1]
            block_positions = positions[:, -1:] + torch.arange(num_drafts + 1, device=device)
            if snapshot is not None:
                snapshot.take()
            logits = target_forward(block, block_positions, prefill=False)  # [1, n+1, V]
            scores = process_block_scores(logits, input_ids, drafts, logits_processor)
            accepted, next_token = verifier(scores, drafts, input_ids.shape[1], draft_scores)
            # The block's accepted prefix (pending token + accepted drafts) is committed context for the drafter.
            context = taps.take()[:, : accepted + 1]
            context_positions = block_positions[:, : accepted + 1]
            if snapshot is not None and accepted < num_drafts:
                # Linear-attention states absorbed the rejected drafts and cannot be cropped: restore the states
                # from before the block and advance them over the accepted prefix only.
                t2 = time.perf_counter()
                snapshot.restore(num_drafts + 1)
                target_forward(block[:, : accepted + 1], context_positions, prefill=False)
                taps.take()  # identical to the verify forward's taps of these positions
                stats.num_rollback_forwards += 1
                stats.rollback_time_s += time.perf_counter() - t2
            else:
                crop_cache(cache, num_drafts - accepted)
            stats.acceptance_lengths.append(accepted + 1)
            committed = torch.cat((drafts[0, :accepted], next_token))
            done = commit(committed, scores[:, : accepted + 1], logits[:, : accepted + 1])
            # A stop inside the block leaves processed tokens past the end of the sequence: drop them, so that
            # the returned cache holds exactly what plain generate's does (every token but the last).
            surplus = cache.get_seq_length() - (input_ids.shape[1] - 1)
            if done and surplus > 0:
                kept = accepted + 1 - surplus
                if snapshot is not None:  # back to before the block, then forward over the kept tokens only
                    snapshot.restore(accepted + 1)
                    target_forward(block[:, :kept], context_positions[:, :kept], prefill=False,
                                   start=int(block_positions[0, 0]))
                    taps.take()
                    stats.num_rollback_forwards += 1
                else:
                    crop_cache(cache, surplus)
                context, context_positions = context[:, :kept], context_positions[:, :kept]
            stats.verify_time_s += time.perf_counter() - t1
        stats.draft_cache_bytes = session.cache.nbytes()
        keep_draft_context(cache, session, context, context_positions)

    if streamer is not None:
        streamer.end()
    if not generation_config.return_dict_in_generate:
        return input_ids
    return make_generate_output(
        input_ids,
        cache,
        scores=tuple(scores_out) if want_scores else None,
        logits=tuple(logits_out) if want_logits else None,
    )


# ------------------------------------------------------------------------------------------------------------------
# Batched decoding: ragged rows in one cache
# ------------------------------------------------------------------------------------------------------------------
# Design. All rows run one verify forward per step over n+1 slots, but each row accepts its own count. The
# target cache keeps one slot axis for the batch: a row's rejected slots stay in place as holes, hidden by the 2-D
# attention mask (exactly like left padding), and every row carries its own RoPE positions. Slots rejected by
# every row are cropped at once. When holes pile up (more than COMPACT_MIN_HOLES and a quarter of the cache) the
# live slots of each row are gathered to the right, in order, behind left padding — keys hold their RoPE, so
# moving them changes nothing — and the same is done to the draft cache. Finished rows leave the batch.
COMPACT_MIN_HOLES = 32


def _batched_request_problem(streamer: Any, want_outputs: bool) -> str | None:
    if streamer is not None:
        return "a streamer takes one sequence; stream one prompt per generate call"
    if want_outputs:
        return "output_scores / output_logits are per step, and rows of a DFlash batch advance by different amounts"
    return None


def run_batched_dflash_decoding(
    target: nn.Module,
    drafter: nn.Module,
    input_ids: torch.LongTensor,
    logits_processor: Any,
    stopping_criteria: Any,
    generation_config: Any,
    streamer: Any = None,
    options: DFlashOptions | None = None,
    **model_kwargs: Any,
) -> Any:
    """DFlash decoding of a (left-padded) batch: every row equals plain ``generate`` on that prompt alone."""
    num_rows = input_ids.shape[0]
    options = options or DFlashOptions.from_drafter(drafter)
    cache = cache_from_model_kwargs(model_kwargs)
    if cache is None:
        raise RuntimeError("generate did not prepare a KV cache; DFlash needs use_cache=True.")
    want_outputs = generation_config.return_dict_in_generate and (
        generation_config.output_scores or generation_config.output_logits
    )
    problem = _batched_request_problem(streamer, want_outputs) or ragged_batch_problem(cache)
    if problem:
        raise ValueError(
            f"Batched DFlash generation (batch of {num_rows}) is not available here: {problem}. Call generate "
            "once per prompt (batch size 1 supports it), or drop `assistant_model`."
        )
    device = input_ids.device
    attention_mask = model_kwargs.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(device=device, dtype=torch.long)
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError(
            "The batch is right-padded; DFlash (like generate) needs left padding. Set "
            "tokenizer.padding_side = 'left' before tokenizing the prompts."
        )
    pad_token = generation_config._pad_token_tensor
    eos = generation_config._eos_token_tensor
    if pad_token is None and eos is not None:
        pad_token = eos.view(-1)[0]

    cache_kwarg = forward_cache_kwarg(target)
    verifier = BlockVerifier(bool(generation_config.do_sample), options.sampling_mode, device)
    session = DraftSession(target, drafter)
    block_size = session.block_size
    stats = DFlashStats(sampling=verifier.mode, block_size=block_size, verify_backend=verifier.backend)
    row_stats = [DFlashStats(sampling=verifier.mode, block_size=block_size, verify_backend=verifier.backend)
                 for _ in range(num_rows)]
    stats.rows = row_stats
    drafter.last_stats = stats

    sequences = [input_ids[r : r + 1] for r in range(num_rows)]  # each [1, padded prompt + generated]
    live = torch.arange(num_rows, device=device)  # original indices of the rows still generating
    real_len = attention_mask.sum(dim=1)  # [R] real tokens committed per live row (the next token's position)
    padding = input_ids.shape[1] - real_len  # [R] left padding per live row: a row's length is padding + real_len + 1

    def forward(tokens: torch.Tensor, token_positions: torch.Tensor, mask: torch.Tensor, prefill: bool) -> torch.Tensor:
        kwargs = {cache_kwarg: cache, "use_cache": True, "attention_mask": mask, "position_ids": token_positions.clamp(min=0)}
        if prefill and target._supports_logits_to_keep():
            kwargs["logits_to_keep"] = 1
        stats.num_target_forwards += 1
        for r in live.tolist():
            row_stats[r].num_target_forwards += 1
        with few_row_linear(device, not prefill and options.few_row_matmul_on_cpu):
            return target(input_ids=tokens, **kwargs).logits

    processors = BatchProcessorView(logits_processor, num_rows, pad_token)

    def stand_ins(drafts: torch.Tensor) -> list[torch.Tensor]:
        """Each batch row's longest known ids: its sequence, and for a live row its drafts after it."""
        rows = [seq[0] for seq in sequences]
        for i, r in enumerate(live.tolist()):
            rows[r] = torch.cat((rows[r], drafts[i]))
        return rows

    def row_scores(logits: torch.Tensor, drafts: torch.Tensor) -> torch.Tensor:
        """logits [R, n+1, V] -> fp32 scores: slot t of live row i is processed with its sequence + drafts[:t]."""
        if not processors:
            return logits.float()
        requests = [
            (r, torch.cat((sequences[r][0], drafts[i, :t])), logits[i, t])
            for i, r in enumerate(live.tolist()) for t in range(logits.shape[1])
        ]
        processed = processors.score(requests, stand_ins(drafts))
        return torch.stack(processed).view(logits.shape[0], logits.shape[1], -1)

    def sampled_drafts(draft_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Ratio mode: drafts [R, n] sampled slot after slot from the processed q, and that q [R, n, V]."""
        if not processors or draft_logits.shape[1] == 0:
            draft_scores = draft_logits.float()
            return verifier.sample_draft_rows(draft_scores, real_len + 1), draft_scores
        drafts = draft_logits.new_zeros(draft_logits.shape[:2], dtype=torch.long)
        slots = []
        for t in range(draft_logits.shape[1]):
            requests = [(r, torch.cat((sequences[r][0], drafts[i, :t])), draft_logits[i, t])
                        for i, r in enumerate(live.tolist())]
            slot = torch.stack(processors.score(requests, stand_ins(drafts[:, :t])))  # [R, V]
            drafts[:, t] = verifier.sample_draft_rows(slot[:, None], real_len + 1 + t)[:, 0]
            slots.append(slot)
        return drafts, torch.stack(slots, dim=1)

    def commit(row: int, tokens: list[int], step_scores: torch.Tensor) -> bool:
        """Append a row's tokens one at a time; True once one of its stopping criteria fires."""
        for i, token in enumerate(tokens):
            sequences[row] = torch.cat((sequences[row], sequences[row].new_tensor([[token]])), dim=1)
            row_stats[row].new_tokens += 1
            stats.new_tokens += 1
            if bool(stopping_criteria(sequences[row], step_scores[None, i]).any()):
                return True
        return False

    with TapRecorder(target, drafter.config.target_layer_ids, session.device) as taps, torch.no_grad():
        t0 = time.perf_counter()
        prompt_positions = _positions_from_mask(attention_mask, input_ids.shape[1], device)  # -1 on padding
        # Only the prompt columns the cache does not hold yet. The drafter's context starts there: a batch returns
        # no cache of its own (rows leave it as they finish), so a filled one came from plain generate.
        cached = prompt_tokens_in_cache(cache, input_ids)
        prompt_positions = prompt_positions[:, cached:]
        logits = forward(input_ids[:, cached:], prompt_positions, attention_mask, prefill=True)[:, -1:]
        context, context_positions = taps.take(), prompt_positions  # [R, P, K*H], [R, P]
        no_drafts = input_ids[:, :0]
        scores = row_scores(logits, no_drafts)
        _, next_token = verifier.verify_rows(scores, no_drafts, torch.zeros_like(real_len), real_len)
        stats.prefill_time_s = time.perf_counter() - t0
        finished = torch.tensor([commit(r, [int(next_token[i])], scores[i]) for i, r in enumerate(live.tolist())])
        peak_slots = cache.get_seq_length()

        while True:
            keep = (~finished[live.cpu()]).nonzero().view(-1).to(device)  # indices into the live rows
            if keep.numel() == 0:
                break
            if keep.numel() < live.numel():  # finished rows stop costing work
                live, real_len, padding, next_token = live[keep], real_len[keep], padding[keep], next_token[keep]
                attention_mask, context, context_positions = attention_mask[keep], context[keep], context_positions[keep]
                select_cache_rows(cache, keep)
                session.cache.select_rows(keep.to(session.device))
            t0 = time.perf_counter()
            cur_len = padding + real_len + 1  # each row's sequence length, its pending token included
            # Never draft past max_length: a row near its end verifies fewer drafts (its extra slots are holes).
            num_drafts = (generation_config.max_length - cur_len - 1).clamp(min=0, max=session.max_drafts)
            width = int(num_drafts.max())
            anchor_positions = real_len.to(session.device)
            draft_logits = session.propose(next_token, anchor_positions, context, context_positions)
            draft_logits = draft_logits[:, :width].to(device)
            draft_scores = None
            if verifier.samples_drafts:
                drafts, draft_scores = sampled_drafts(draft_logits)
            else:
                drafts = draft_logits.argmax(dim=-1)  # [R, n]
            t1 = time.perf_counter()
            stats.draft_time_s += t1 - t0

            block = torch.cat((next_token[:, None], drafts), dim=1)  # [R, n+1]
            block_positions = real_len[:, None] + torch.arange(width + 1, device=device)
            attention_mask = torch.cat((attention_mask, attention_mask.new_ones(live.numel(), width + 1)), dim=1)
            logits = forward(block, block_positions, attention_mask, prefill=False)  # [R, n+1, V]
            peak_slots = max(peak_slots, cache.get_seq_length())
            scores = row_scores(logits, drafts)
            accepted, next_token = verifier.verify_rows(scores, drafts, num_drafts, real_len + 1, draft_scores)

            # Row r keeps slots 0…accepted[r] of the block; the rest are holes. Slots no row kept are cropped.
            slot = torch.arange(width + 1, device=device)
            kept = slot[None, :] <= accepted[:, None]  # [R, n+1]
            attention_mask[:, -(width + 1) :] = kept.long()
            drop = width - int(accepted.max())
            crop_cache(cache, drop)
            attention_mask = attention_mask[:, : attention_mask.shape[1] - drop]
            context = taps.take()[:, : width + 1 - drop]
            context_positions = block_positions[:, : width + 1 - drop].masked_fill(~kept[:, : width + 1 - drop], -1)
            real_len = real_len + accepted + 1

            for i, r in enumerate(live.tolist()):
                a = int(accepted[i])
                row_stats[r].acceptance_lengths.append(a + 1)
                stats.acceptance_lengths.append(a + 1)
                finished[r] = commit(r, drafts[i, :a].tolist() + [int(next_token[i])], scores[i])
            if _compact_if_wasteful(cache, attention_mask, session.cache):
                attention_mask = _left_aligned_mask(attention_mask)
            stats.verify_time_s += time.perf_counter() - t1
        stats.draft_cache_bytes = session.cache.nbytes()
        stats.draft_cache_slots = session.cache.length()
        stats.peak_cache_slots = peak_slots

    return _assemble_batch(sequences, pad_token, generation_config)


def _compact_if_wasteful(cache: Any, attention_mask: torch.Tensor, draft_cache: Any) -> bool:
    """Squeeze holes out of both caches once they are worth a gather; True when the target cache was compacted."""
    compacted = False
    slots = attention_mask.shape[1]
    holes = slots - int(attention_mask.sum(dim=1).max())
    if holes >= max(COMPACT_MIN_HOLES, slots // 4):
        from .modeling_dflash import compaction_order

        order, _ = compaction_order(attention_mask.bool())
        gather_cache_slots(cache, order)
        compacted = True
    draft_length = draft_cache.length()
    if draft_cache.padding_slots() >= max(COMPACT_MIN_HOLES, draft_length // 4):
        draft_cache.compact()
    return compacted


def _left_aligned_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """The mask after compaction: each row's live slots last."""
    count = attention_mask.sum(dim=1)
    width = int(count.max())
    return (torch.arange(width, device=attention_mask.device)[None, :] >= (width - count)[:, None]).long()


def _assemble_batch(sequences: list[torch.Tensor], pad_token: Any, generation_config: Any) -> Any:
    """Right-pad rows that stopped early with the pad token, as plain batched generate does."""
    longest = max(seq.shape[1] for seq in sequences)
    if any(seq.shape[1] < longest for seq in sequences) and pad_token is None:
        raise ValueError(
            "Rows of the batch stopped at different lengths and the generation config has neither pad_token_id "
            "nor eos_token_id to fill them; set generation_config.pad_token_id."
        )
    rows = [
        torch.cat((seq, seq.new_full((1, longest - seq.shape[1]), int(pad_token))), dim=1) if seq.shape[1] < longest
        else seq
        for seq in sequences
    ]
    output = torch.cat(rows)
    if not generation_config.return_dict_in_generate:
        return output
    return make_generate_output(output, None)  # finished rows left the cache: it no longer matches the batch


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
        self.prompt_len: int | None = None  # set until the prefill's taps are read
        self.stats = DFlashStats(sampling="strict" if getattr(generation_config, "do_sample", False) else "greedy")
        self.stats.block_size = drafter.config.block_size
        drafter.last_stats = self.stats

    @torch.no_grad()
    def get_candidates(self, input_ids: torch.LongTensor, **kwargs: Any) -> tuple[torch.LongTensor, None]:
        cur_len = input_ids.shape[1]
        if self.last_forward_start is None:  # the target has not run yet: let its prefill produce the context
            self.last_forward_start = 0
            self.prompt_len = cur_len
            return input_ids, None
        t0 = time.perf_counter()
        captured = self.taps.take()  # [1, T, K*H] for positions last_forward_start …
        if self.prompt_len is not None:
            # The prefill ran over the prompt tokens its cache lacked: a filled cache (multi-turn) held the rest,
            # whose context the drafter never gets in this loop.
            self.last_forward_start = self.context_len = self.prompt_len - captured.shape[1]
            self.prompt_len = None
        else:
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
        if self.prompt_len is None:  # a verify step ran after the prefill
            self.stats.acceptance_lengths.append(final_len - 1 - self.last_forward_start)

    def close(self) -> None:
        self.taps.close()


# ------------------------------------------------------------------------------------------------------------------
# Zero-flag dispatch
# ------------------------------------------------------------------------------------------------------------------
def _assistant_from(args: tuple, kwargs: dict) -> Any:
    gen_kwargs = kwargs.get("generation_mode_kwargs")
    if gen_kwargs is None and len(args) >= 3:
        gen_kwargs = args[2]
    return (gen_kwargs or {}).get("assistant_model")


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
        assistant = _assistant_from(args, kwargs)
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
            generation_config = args[1] if len(args) > 1 else kwargs.get("generation_config")
            if generation_config is not None and generation_config.use_cache is False:
                # Runs before generate prepares its cache. DFlash verifies blocks against a KV cache; with or without
                # one the target computes the same tokens, so the request is honoured in what it returns.
                logger.warning_once(
                    "use_cache=False is ignored with a DFlash assistant: DFlash needs the target's KV cache (the "
                    "output is the same). Drop use_cache=False to silence this warning."
                )
                generation_config.use_cache = True
            if getattr(self, "_is_stateful", False):
                # transformers refuses assisted decoding on stateful (hybrid) models because its loop cannot roll
                # their states back; the DFlash loop can, the stock loop cannot.
                if getattr(assistant, "generation_loop", "dflash") == "transformers":
                    raise ValueError(
                        f"{type(self).__name__} keeps linear-attention state that transformers' assisted loop cannot "
                        "roll back. Use the DFlash loop (drafter.generation_loop = 'dflash', the default)."
                    )
                self._is_stateful = False  # instance attribute shadows the class flag for this check only
                try:
                    return original_validate(self, *args, **kwargs)
                finally:
                    del self._is_stateful
        return original_validate(self, *args, **kwargs)

    @functools.wraps(original_get_generator)
    def _get_candidate_generator(self, generation_config, *args, **kwargs):
        assistant = kwargs.get("assistant_model")
        if is_dflash_drafter(assistant):
            generator = DFlashCandidateGenerator(self, assistant, generation_config)
            getattr(assistant, "_dflash_open_generators", []).append(generator)  # closed by _assisted_decoding
            return generator
        return original_get_generator(self, generation_config, *args, **kwargs)

    @functools.wraps(original_assisted)
    def _assisted_decoding(self, *args, **kwargs):
        assistant = kwargs.get("assistant_model")
        if not is_dflash_drafter(assistant):
            return original_assisted(self, *args, **kwargs)
        if getattr(assistant, "generation_loop", "dflash") != "transformers":
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
            prompt_len = (args[0] if args else kwargs["input_ids"]).shape[1]
            for generator in generators:
                generator.finish(sequences.shape[1], prompt_len)
            return result
        finally:
            for generator in generators:
                generator.close()
            assistant._dflash_open_generators = []

    GenerationMixin._validate_generation_mode = _validate_generation_mode
    GenerationMixin._get_candidate_generator = _get_candidate_generator
    GenerationMixin._assisted_decoding = _assisted_decoding
    GenerationMixin._dflash_patch_installed = True


__all__ = [
    "DFlashCandidateGenerator",
    "DFlashStats",
    "DraftSession",
    "TapRecorder",
    "install_generate_patch",
    "is_dflash_drafter",
    "run_dflash_decoding",
    "target_decoder_layers",
    "target_text_config",
    "validate_pair",
]

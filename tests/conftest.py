"""Shared fixtures: tiny random targets of every supported family, and a scripted drafter."""

from __future__ import annotations

import os

# Triton reads this once, at its first import (transformers imports it): kernel tests run in the interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

import dflash_hf
from dflash_hf.core.draft_dflash import DraftSession

VOCAB = 96
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    eos_token_id=None,
    pad_token_id=None,
    bos_token_id=None,
)

FAMILIES = {
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(head_dim=8, **COMMON)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**COMMON)),
    "qwen3_moe": lambda: Qwen3MoeForCausalLM(
        Qwen3MoeConfig(head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, **COMMON)
    ),
    "llama": lambda: LlamaForCausalLM(LlamaConfig(head_dim=8, **COMMON)),
}


def make_target(family: str, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    """A tiny random target. float64: random tiny models have near-ties that fp32 rounding could flip."""
    torch.manual_seed(seed)
    model = FAMILIES[family]()
    if family == "qwen3_moe":
        model.config._experts_implementation = "eager"  # grouped_mm has no float64 kernel
    model = model.to(dtype).eval()
    model.generation_config.pad_token_id = None
    model.generation_config.eos_token_id = None
    return model


@pytest.fixture(autouse=True)
def few_row_routine_always(monkeypatch):
    """The few-row plan times BLAS against the routine on the running machine; here every few-row product takes
    the routine, so which product runs never depends on timing (tests/test_few_row_plan.py covers the measured
    plan)."""
    import dflash_hf.core.matmul_dflash as matmul

    monkeypatch.setattr(matmul, "measured_plan", matmul.AlwaysRoutine)


def make_drafter(target: torch.nn.Module, block_size: int = 8, seed: int = 1) -> dflash_hf.DFlashDraftModel:
    torch.manual_seed(seed)
    return dflash_hf.DFlashDraftModel.from_target(target, num_hidden_layers=1, block_size=block_size).eval()


@pytest.fixture(params=sorted(FAMILIES))
def family(request) -> str:
    return request.param


class Script:
    """Makes DraftSession.propose return the target's true continuation with errors at chosen slots.

    ``reference``: the full greedy sequence of the target. ``error_slots[s]`` is the 1-based block slot whose
    draft is wrong at verify step s (None: every draft right). Acceptance length of step s is then known
    exactly: ``error_slot`` (the drafts before it + the target's token), or B when all drafts are right.
    """

    def __init__(self, reference: torch.Tensor, error_slots: list, vocab: int) -> None:
        self.reference = reference[0]
        self.error_slots = list(error_slots)
        self.vocab = vocab
        self.step = 0

    def propose(self, session, anchor, anchor_position, context_taps, context_positions, num_drafts=None):
        block = session.block_size
        pos = int(anchor_position[0]) + 1 + torch.arange(block - 1)
        truth = self.reference[pos.clamp(max=self.reference.shape[0] - 1)].clone()
        slot = self.error_slots[self.step] if self.step < len(self.error_slots) else None
        if slot is not None:
            truth[slot - 1] = (truth[slot - 1] + 1) % self.vocab
        self.step += 1
        logits = torch.full((1, block - 1, self.vocab), -1.0, dtype=torch.float64)
        logits[0, torch.arange(block - 1), truth] = 1.0
        return logits[:, :num_drafts]  # the slots the step verifies, as DraftSession.propose returns them


@pytest.fixture
def scripted(monkeypatch):
    """Install a Script on DraftSession.propose; returns a factory ``(reference, error_slots) -> Script``."""

    def install(reference: torch.Tensor, error_slots: list, vocab: int = VOCAB) -> Script:
        script = Script(reference, error_slots, vocab)
        monkeypatch.setattr(
            DraftSession, "propose", lambda self, *a: script.propose(self, *a)
        )
        return script

    return install


# ---------------------------------------------------------------------------------------------------------------
# Goodness of fit of sampled generations against the exact law of plain sampling
# ---------------------------------------------------------------------------------------------------------------
SMALL_CHI_SQUARE_SAMPLES = 1000


def warped_probs(model, ids: torch.Tensor, temperature: float, top_k: int) -> torch.Tensor:
    """Next-token law of ``model`` after ``ids`` under the temperature and top-k warpers generate applies."""
    with torch.no_grad():
        logits = model(ids).logits[0, -1] / temperature
    kth = logits.topk(top_k).values[-1]
    return torch.softmax(logits.masked_fill(logits < kth, float("-inf")), -1)


def exact_pair_law(model, start: torch.Tensor, temperature: float, top_k: int) -> torch.Tensor:
    """P(t2, t3) = sum_t1 p(t1) p(t2|t1) p(t3|t1,t2): the joint law of generated tokens 2 and 3. [V, V]"""
    vocab = model.config.get_text_config().vocab_size
    expected = torch.zeros(vocab, vocab, dtype=torch.float64)
    p1 = warped_probs(model, start, temperature, top_k)
    for t1 in torch.nonzero(p1).flatten().tolist():
        s1 = torch.cat((start, torch.tensor([[t1]])), 1)
        p2 = warped_probs(model, s1, temperature, top_k)
        for t2 in torch.nonzero(p2).flatten().tolist():
            p3 = warped_probs(model, torch.cat((s1, torch.tensor([[t2]])), 1), temperature, top_k)
            expected[t2] += p1[t1] * p2[t2] * p3
    return expected


def chi_square_p_value(counts: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson chi-square p-value of observed ``counts`` against the law ``expected`` (cells with an expected
    count <= 5 are left out, and must hold almost nothing)."""
    from scipy.stats import chisquare

    samples = counts.sum()
    flat_expected = expected.flatten() * samples
    keep = flat_expected > 5
    assert counts.flatten()[~keep].sum() <= 0.02 * samples, "mass where the exact law has almost none"
    observed = counts.flatten()[keep]
    exp = flat_expected[keep] * observed.sum() / flat_expected[keep].sum()
    return float(chisquare(observed.numpy(), exp.numpy()).pvalue)

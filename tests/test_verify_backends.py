"""The fused Triton verification inside generate (run by the Triton interpreter on CPU in CI)."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, make_drafter, make_target
from dflash_hf.kernels import triton_available


@pytest.fixture
def force_triton(monkeypatch):
    if not triton_available():
        pytest.fail("triton is not installed: the test extra must bring it (pip install -e '.[test]')")
    monkeypatch.setenv("DFLASH_HF_VERIFY", "triton")


def test_greedy_with_triton_backend_is_lossless(force_triton, scripted):
    target = make_target("qwen3", dtype=torch.float32)
    drafter = make_drafter(target)
    prompt = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))
    plain = target.generate(prompt, max_new_tokens=14, do_sample=False)
    scripted(plain, [None, 3])
    fast = target.generate(prompt, max_new_tokens=14, do_sample=False, assistant_model=drafter)
    assert torch.equal(plain, fast)
    assert drafter.last_stats.verify_backend == "triton"
    assert drafter.last_stats.acceptance_lengths[:2] == [8, 3]


@pytest.mark.parametrize("mode", ["strict", "ratio"])
def test_sampling_with_triton_backend_is_reproducible(force_triton, mode):
    target = make_target("qwen3", dtype=torch.float32)
    drafter = make_drafter(target)
    drafter.sampling_mode = mode
    prompt = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(1))
    runs = []
    for _ in range(2):
        torch.manual_seed(42)
        runs.append(target.generate(prompt, max_new_tokens=10, do_sample=True, temperature=0.9, top_k=20,
                                    assistant_model=drafter))
    assert torch.equal(runs[0], runs[1])
    assert drafter.last_stats.verify_backend == "triton" and drafter.last_stats.sampling == mode
    torch.manual_seed(43)
    other = target.generate(prompt, max_new_tokens=10, do_sample=True, temperature=0.9, top_k=20,
                            assistant_model=drafter)
    assert other.shape[1] == runs[0].shape[1]


def test_cpu_default_backend_is_torch():
    target = make_target("qwen3")
    drafter = make_drafter(target)
    target.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, assistant_model=drafter)
    assert drafter.last_stats.verify_backend == "torch"

"""Fused verification kernels: Triton (under TRITON_INTERPRET=1, on CPU) against the pure-torch reference,
sampling goodness-of-fit, keyed-randomness independence, and backend dispatch."""

import os

# Triton honours this only at its first import (which importing dflash_hf / transformers may trigger): set it first.
os.environ["TRITON_INTERPRET"] = "1"

import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from dflash_hf.kernels import dispatch  # noqa: E402
from dflash_hf.kernels import reference as ref  # noqa: E402
from dflash_hf.kernels.keyed_random import STREAM_DRAFT, STREAM_TARGET, keyed_uniform, stream_key, stream_key_i32  # noqa: E402

from dflash_hf import kernels  # noqa: E402

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
from dflash_hf.kernels import triton_verify as tv  # noqa: E402

# TRITON_INTERPRET is only honoured at triton's FIRST import. If another test module imported dflash_hf or
# transformers (which import triton) before this one, the kernels cannot run here: every test below is then skipped
# and test_kernels_in_fresh_process reruns this whole file in a fresh process with the interpreter on.
# (Setting TRITON_INTERPRET=1 in tests/conftest.py or the CI environment avoids the extra process.)
_CHILD_FLAG = "_DFLASH_HF_KERNEL_TESTS_CHILD"
_RERUN = not tv.interpreter_active()
_RERUN_TEST = "test_kernels_in_fresh_process"


@pytest.fixture(autouse=True)
def _skip_if_rerun_in_subprocess(request: pytest.FixtureRequest) -> None:
    if _RERUN and request.node.name != _RERUN_TEST:
        pytest.skip(f"triton was imported before TRITON_INTERPRET=1; covered by {_RERUN_TEST}")


def test_kernels_in_fresh_process() -> None:
    if not _RERUN:
        pytest.skip("the interpreter is active in this process: the tests run here directly")
    assert not os.environ.get(_CHILD_FLAG), "TRITON_INTERPRET=1 did not take effect even in a fresh process"
    env = dict(os.environ, TRITON_INTERPRET="1", **{_CHILD_FLAG: "1"})
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-2000:]


# The residual kernel takes log(0) = -inf on purpose; the interpreter (numpy) warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")


# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------


def _num_drafts(R: int, T: int, gen: torch.Generator) -> torch.Tensor:
    """Ragged: row 0 full, row 1 empty, the rest random (R=1: full)."""
    D = T - 1
    nd = torch.randint(0, D + 1, (R,), generator=gen)
    nd[0] = D
    if R > 1:
        nd[1] = 0
    return nd


def _diverge(tokens: torch.Tensor, V: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Drafts equal to ``tokens`` [R, T] except a wrong token at slot k_r = r + 1 (k_r = T-1: no wrong slot), so
    exactly min(k_r, num_drafts_r) drafts are accepted. Returns (drafts [R, T-1], k [R])."""
    R, T = tokens.shape
    drafts = tokens[:, : T - 1].clone()
    k = torch.clamp(torch.arange(R) + 1, max=T - 1)
    for r in range(R):
        if k[r] < T - 1:
            drafts[r, k[r]] = (drafts[r, k[r]] + 1) % V
    return drafts, k


def _chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square goodness-of-fit p-value over the cells with positive probability (no scipy needed:
    the chi2 survival function is the regularised upper incomplete gamma function)."""
    n = counts.sum()
    keep = probs > 0
    assert counts[~keep].sum() == 0, "a zero-probability token was sampled"
    expected = n * probs[keep].double()
    stat = ((counts[keep].double() - expected) ** 2 / expected).sum()
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


def _first_committed(num_accepted: torch.Tensor, next_token: torch.Tensor, drafts: torch.Tensor) -> torch.Tensor:
    return torch.where(num_accepted >= 1, drafts[:, 0], next_token)


# ---------------------------------------------------------------------------------------------------------------
# Keyed randomness
# ---------------------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["key"])
def _uniform_probe_kernel(pos_ptr, out_ptr, key, NTOK: tl.constexpr):
    i = tl.program_id(0)
    pos = tl.load(pos_ptr + i).to(tl.uint32)
    tok = tl.arange(0, NTOK)
    tl.store(out_ptr + i * NTOK + tok, tv._uniform(key, pos, tok.to(tl.uint32)))


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**40 + 3, -5])
def test_uniform_bit_identical_torch_triton(seed: int) -> None:
    positions = torch.tensor([0, 1, 7, 1000, 2**31 - 1, 2**31 + 5, 2**32 + 9], dtype=torch.int64)
    ntok = 256
    out = torch.empty(len(positions), ntok, dtype=torch.float32)
    _uniform_probe_kernel[(len(positions),)](positions, out, stream_key_i32(seed, STREAM_TARGET), NTOK=ntok)
    expected = keyed_uniform(stream_key(seed, STREAM_TARGET), positions[:, None], torch.arange(ntok)[None, :])
    assert torch.equal(out, expected)


def test_uniform_statistics() -> None:
    u = keyed_uniform(stream_key(7, STREAM_DRAFT), torch.arange(200)[:, None], torch.arange(500)[None, :])
    assert 0.0 < float(u.min()) and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.005
    assert abs(float(u.var()) - 1 / 12) < 0.002
    counts = torch.histc(u, bins=20, min=0.0, max=1.0)
    assert _chi2_pvalue(counts, torch.full((20,), 0.05)) > 1e-3
    # Neighbouring positions and neighbouring tokens are uncorrelated.
    assert abs(float(torch.corrcoef(torch.stack([u[:-1].flatten(), u[1:].flatten()]))[0, 1])) < 0.02
    assert abs(float(torch.corrcoef(torch.stack([u[:, :-1].flatten(), u[:, 1:].flatten()]))[0, 1])) < 0.02
    # Different streams and seeds give different numbers.
    other = keyed_uniform(stream_key(7, STREAM_TARGET), torch.arange(200)[:, None], torch.arange(500)[None, :])
    assert (u == other).float().mean() < 0.01


# ---------------------------------------------------------------------------------------------------------------
# Triton == reference, exactly
# ---------------------------------------------------------------------------------------------------------------

CASES = [
    # R, T, V, dtype, block_v (None: one tile; small: several tiles, exercising the cross-tile merges)
    (1, 1, 7, torch.float32, None),
    (3, 1, 50, torch.float32, 16),
    (3, 4, 7, torch.bfloat16, None),
    (3, 4, 50, torch.bfloat16, 16),
    (1, 8, 50, torch.float32, None),
    (1, 4, 1000, torch.float32, 256),
    (3, 8, 1000, torch.float32, 128),
    (3, 8, 1000, torch.bfloat16, None),
]


@pytest.mark.parametrize("R,T,V,dtype,block_v", CASES)
def test_triton_matches_reference(R: int, T: int, V: int, dtype: torch.dtype, block_v: int | None) -> None:
    gen = torch.Generator().manual_seed(1000 * R + 10 * T + V)
    # Scaled logits: peaked enough that sampled drafts are often accepted.
    target = (3.0 * torch.randn(R, T, V, generator=gen)).to(dtype)
    draft_logits = (target[:, : T - 1].float() + 0.7 * torch.randn(R, T - 1, V, generator=gen)).to(dtype)
    nd = _num_drafts(R, T, gen)
    positions = torch.randint(0, 10_000, (R,), generator=gen)
    seed = 17

    # greedy: drafts = target argmax with an injected error at slot k_r -> acceptance known exactly.
    drafts, k = _diverge(target.float().argmax(-1), V)
    expected = ref.greedy_verify(target, drafts, nd)
    assert torch.equal(expected[0], torch.minimum(k, nd))
    got = tv.greedy_verify(target, drafts, nd, block_v=block_v)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])

    # strict: drafts = the target's own keyed samples with an injected error -> acceptance known exactly.
    samples = ref.sample_keyed(target, seed, positions, STREAM_TARGET)
    drafts, k = _diverge(samples, V)
    expected = ref.strict_verify(target, drafts, nd, seed, positions)
    assert torch.equal(expected[0], torch.minimum(k, nd))
    assert torch.equal(expected[1], samples[torch.arange(R), expected[0]])
    got = tv.strict_verify(target, drafts, nd, seed, positions, block_v=block_v)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])

    # sample_keyed itself (all slots, no raggedness).
    assert torch.equal(tv.sample_keyed(target, seed, positions, STREAM_TARGET, block_v=block_v), samples)

    # ratio: drafts sampled from q, as the drafter would.
    if T > 1:
        drafts = ref.sample_keyed(draft_logits, seed, positions, STREAM_DRAFT)
        assert torch.equal(tv.sample_keyed(draft_logits, seed, positions, block_v=block_v), drafts)
    else:
        drafts = torch.zeros(R, 0, dtype=torch.int64)
    expected = ref.ratio_verify(target, draft_logits, drafts, nd, seed, positions)
    got = tv.ratio_verify(target, draft_logits, drafts, nd, seed, positions, block_v=block_v)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert bool((expected[0] <= nd).all())


def test_ratio_acceptance_is_nontrivial_and_matches() -> None:
    """Several seeds over one batch: both accepting and rejecting paths (residual and bonus) are exercised."""
    gen = torch.Generator().manual_seed(3)
    R, T, V = 3, 4, 50
    target = 2.0 * torch.randn(R, T, V, generator=gen)
    draft_logits = target[:, :3] + 0.8 * torch.randn(R, T - 1, V, generator=gen)
    nd = torch.tensor([3, 2, 3])
    positions = torch.tensor([5, 900, 77])
    seen = set()
    for seed in range(6):
        drafts = ref.sample_keyed(draft_logits, seed, positions, STREAM_DRAFT)
        expected = ref.ratio_verify(target, draft_logits, drafts, nd, seed, positions)
        got = tv.ratio_verify(target, draft_logits, drafts, nd, seed, positions, block_v=16)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
        seen.update(expected[0].tolist())
        for r in range(R):
            if expected[0][r] == nd[r]:  # all accepted: the bonus is the target's keyed sample at slot nd
                bonus = ref.sample_keyed(target[r : r + 1], seed, positions[r : r + 1], STREAM_TARGET)
                assert bonus[0, nd[r]] == expected[1][r]
    assert len(seen) >= 3, seen  # several distinct acceptance lengths


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_full_vocab_greedy_strict(dtype: torch.dtype) -> None:
    """One cheap full-width case (Qwen vocabulary, several tiles)."""
    gen = torch.Generator().manual_seed(11)
    R, T, V = 1, 4, 151936
    target = (4.0 * torch.randn(R, T, V, generator=gen)).to(dtype)
    nd = torch.tensor([T - 1])
    positions = torch.tensor([123456])

    drafts = target.float().argmax(-1)[:, : T - 1].clone()
    drafts[0, 1] = (drafts[0, 1] + 1) % V  # accept exactly one
    expected = ref.greedy_verify(target, drafts, nd)
    assert expected[0].tolist() == [1]
    got = tv.greedy_verify(target, drafts, nd)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])

    samples = ref.sample_keyed(target, 5, positions, STREAM_TARGET)
    drafts = samples[:, : T - 1].clone()
    drafts[0, 2] = (drafts[0, 2] + 1) % V  # accept exactly two
    expected = ref.strict_verify(target, drafts, nd, 5, positions)
    assert expected[0].tolist() == [2]
    got = tv.strict_verify(target, drafts, nd, 5, positions)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_ties_take_first_index() -> None:
    R, T, V = 3, 4, 50
    gen = torch.Generator().manual_seed(5)
    target = torch.randint(0, 3, (R, T, V), generator=gen).float()  # many exact ties
    target[0, 0] = -1.0
    target[0, 0, [5, 20, 40]] = 7.0  # ties in different 16-wide tiles
    drafts = torch.full((R, T - 1), V - 1, dtype=torch.int64)
    nd = torch.tensor([3, 0, 2])
    expected = ref.greedy_verify(target, drafts, nd)
    assert expected[1][0] == 5
    for block_v in (16, 64):
        got = tv.greedy_verify(target, drafts, nd, block_v=block_v)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    # bf16 collapses nearby values into ties as well.
    target = torch.randn(R, T, 1000, generator=gen).to(torch.bfloat16)
    drafts = target.float().argmax(-1)[:, : T - 1]
    expected = ref.greedy_verify(target, drafts, nd)
    assert torch.equal(expected[0], nd)
    got = tv.greedy_verify(target, drafts, nd, block_v=64)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_filtered_tokens_never_sampled() -> None:
    """-inf logits (top-k / top-p filtered upstream) are never committed, including whole -inf tiles."""
    R, T, V, keep = 3, 4, 64, 3
    gen = torch.Generator().manual_seed(9)
    target = torch.randn(R, T, V, generator=gen)
    top = target.topk(keep, dim=-1).indices
    allowed = torch.zeros(R, T, V, dtype=torch.bool).scatter_(-1, top, True)
    target = target.masked_fill(~allowed, float("-inf"))
    draft_logits = torch.randn(R, T - 1, V, generator=gen)
    draft_logits = draft_logits.masked_fill(draft_logits < 0.5, float("-inf"))  # q has support p lacks
    nd = torch.tensor([3, 3, 1])
    for seed in range(4):
        positions = torch.tensor([10, 20, 30]) + 100 * seed
        drafts = ref.sample_keyed(draft_logits, seed, positions, STREAM_DRAFT)
        assert torch.isfinite(draft_logits.gather(-1, drafts[..., None])).all()
        samples = tv.sample_keyed(target, seed, positions, STREAM_TARGET, block_v=16)
        assert torch.equal(samples, ref.sample_keyed(target, seed, positions, STREAM_TARGET))
        assert allowed.gather(-1, samples[..., None]).all()
        for name, args, ref_fn, tv_fn in [
            ("strict", (target, drafts, nd, seed, positions), ref.strict_verify, tv.strict_verify),
            ("ratio", (target, draft_logits, drafts, nd, seed, positions), ref.ratio_verify, tv.ratio_verify),
        ]:
            expected = ref_fn(*args)
            got = tv_fn(*args, block_v=16)
            assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1]), name
            assert allowed[torch.arange(R), expected[0], expected[1]].all(), name


# ---------------------------------------------------------------------------------------------------------------
# Keyed randomness: independent of batch composition and block layout
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_samples_independent_of_batch_and_layout(backend: str) -> None:
    impl = ref if backend == "torch" else tv
    gen = torch.Generator().manual_seed(21)
    V = 40
    rows = torch.randn(5, V, generator=gen)  # the logits of one request at positions 100..104
    seed = 99

    alone = impl.sample_keyed(rows[None, 0:4], seed, torch.tensor([100]), STREAM_TARGET)  # block at 100..103
    others = torch.randn(3, 4, V, generator=gen)
    batch = torch.cat([others[:2], rows[None, 0:4], others[2:]])  # the request is row 2 of 4
    in_batch = impl.sample_keyed(batch, seed, torch.tensor([7, 5000, 100, 31]), STREAM_TARGET)
    assert torch.equal(in_batch[2], alone[0])
    shifted = impl.sample_keyed(rows[None, 1:5], seed, torch.tensor([101]), STREAM_TARGET)  # block at 101..104
    assert torch.equal(shifted[0, :3], alone[0, 1:])

    # strict verification commits the same sample for position 101 whichever block/row it comes from.
    drafts = torch.full((1, 3), V - 1)
    na, nt = impl.strict_verify(rows[None, 1:5], drafts, torch.tensor([0]), seed, torch.tensor([101]))
    assert na.item() == 0 and nt.item() == alone[0, 1].item()
    batch = torch.cat([others[:1], rows[None, 1:5]])
    na, nt = impl.strict_verify(batch, torch.full((2, 3), V - 1), torch.tensor([3, 0]), seed, torch.tensor([3, 101]))
    assert nt[1].item() == alone[0, 1].item()


# ---------------------------------------------------------------------------------------------------------------
# Goodness of fit: the first committed token is distributed as p (lossless), acceptance = sum(min(p, q))
# ---------------------------------------------------------------------------------------------------------------

P_LOGITS = torch.tensor([1.2, 0.3, -0.5, 2.0, float("-inf"), 0.0])  # one token p never allows
Q_LOGITS = torch.tensor([0.0, 1.5, 0.4, 0.7, 0.2, -1.0])  # q proposes it anyway


def _gof_batch(n: int, T: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    V = P_LOGITS.numel()
    target = P_LOGITS.expand(n, T, V)  # stride-0 broadcast rows: also exercises non-contiguous inputs
    draft_logits = Q_LOGITS.expand(n, T - 1, V)
    positions = torch.arange(n, dtype=torch.int64) * 37 + 11
    nd = torch.full((n,), T - 1)
    drafts = ref.sample_keyed(draft_logits, 2024, positions, STREAM_DRAFT)
    return target, draft_logits, drafts, nd, positions


def test_goodness_of_fit_reference() -> None:
    n = 20_000
    p = torch.softmax(P_LOGITS, -1)
    q = torch.softmax(Q_LOGITS, -1)
    target, draft_logits, drafts, nd, positions = _gof_batch(n)
    # The drafts really are q-distributed.
    assert _chi2_pvalue(torch.bincount(drafts[:, 0], minlength=6), q) > 1e-3

    na, nt = ref.strict_verify(target, drafts, nd, 2024, positions)
    first = _first_committed(na, nt, drafts)
    assert _chi2_pvalue(torch.bincount(first, minlength=6), p) > 1e-3
    assert abs(float((na >= 1).double().mean()) - float((p * q).sum())) < 5 * math.sqrt(0.25 / n)

    na, nt = ref.ratio_verify(target, draft_logits, drafts, nd, 2024, positions)
    first = _first_committed(na, nt, drafts)
    assert _chi2_pvalue(torch.bincount(first, minlength=6), p) > 1e-3
    # Acceptance of the first draft: P = sum(min(p, q)).
    rate, expected_rate = float((na >= 1).double().mean()), float(torch.minimum(p, q).sum())
    assert abs(rate - expected_rate) < 5 * math.sqrt(expected_rate * (1 - expected_rate) / n)
    # The token after an accepted first draft is p-distributed too (rows are independent).
    second = torch.where(na >= 2, drafts[:, 1], nt)[na >= 1]
    assert _chi2_pvalue(torch.bincount(second, minlength=6), p) > 1e-3


def test_goodness_of_fit_triton_small() -> None:
    n = 300  # the interpreter runs programs one by one: keep the grid small
    p = torch.softmax(P_LOGITS, -1)
    target, draft_logits, drafts, nd, positions = _gof_batch(n, T=2)
    for name, args, ref_fn, tv_fn in [
        ("strict", (target, drafts, nd, 7, positions), ref.strict_verify, tv.strict_verify),
        ("ratio", (target, draft_logits, drafts, nd, 7, positions), ref.ratio_verify, tv.ratio_verify),
    ]:
        na, nt = tv_fn(*args)
        expected = ref_fn(*args)
        assert torch.equal(na, expected[0]) and torch.equal(nt, expected[1]), name
        first = _first_committed(na, nt, drafts)
        assert _chi2_pvalue(torch.bincount(first, minlength=6), p) > 1e-3, name


# ---------------------------------------------------------------------------------------------------------------
# The real compiler (no GPU needed): catches what the interpreter cannot (types, scalar control flow)
# ---------------------------------------------------------------------------------------------------------------


def test_kernels_compile_for_sm90() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", _CHILD_FLAG)}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [sys.executable, "-m", "dflash_hf.kernels.compile_check", "--arch", "90"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "compiled" in proc.stdout


# ---------------------------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------------------------


def _tiny_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(2, 3, 10, generator=gen)
    drafts = target.argmax(-1)[:, :2]
    return target, drafts, torch.tensor([2, 1]), torch.tensor([0, 50])


def test_select_backend_auto_and_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    assert kernels.select_backend("cpu") == "torch"
    assert kernels.select_backend(torch.device("cuda")) == "triton"  # triton importable here
    monkeypatch.setenv(kernels.ENV_VAR, "torch")
    assert kernels.select_backend("cuda") == "torch"
    monkeypatch.setenv(kernels.ENV_VAR, "triton")
    assert kernels.select_backend("cpu") == "triton"  # allowed: TRITON_INTERPRET=1
    monkeypatch.setenv(kernels.ENV_VAR, "cuda-please")
    with pytest.raises(ValueError, match=kernels.ENV_VAR):
        kernels.select_backend("cpu")


def test_verify_dispatches_and_agrees(monkeypatch: pytest.MonkeyPatch) -> None:
    target, drafts, nd, positions = _tiny_batch()
    draft_logits = target[:, :2] + 0.1
    results = {}
    for env in ("torch", "triton"):
        monkeypatch.setenv(kernels.ENV_VAR, env)
        for mode in ("greedy", "strict", "ratio"):
            na, nt, name = kernels.verify(
                mode, target, drafts, nd, draft_logits=draft_logits, seed=3, positions=positions
            )
            assert name == env
            results[env, mode] = (na, nt)
    for mode in ("greedy", "strict", "ratio"):
        assert torch.equal(results["torch", mode][0], results["triton", mode][0])
        assert torch.equal(results["torch", mode][1], results["triton", mode][1])
    monkeypatch.delenv(kernels.ENV_VAR)
    assert kernels.verify("greedy", target, drafts, nd, backend="triton")[2] == "triton"
    assert kernels.verify("greedy", target, drafts, nd)[2] == "torch"
    # The per-mode dispatching helpers.
    assert torch.equal(kernels.greedy_verify(target, drafts, nd, backend="triton")[1], results["torch", "greedy"][1])
    assert torch.equal(
        kernels.sample_keyed(target, 3, positions, backend="triton"), kernels.sample_keyed(target, 3, positions)
    )


def test_verify_argument_errors() -> None:
    target, drafts, nd, positions = _tiny_batch()
    with pytest.raises(ValueError, match="seed"):
        kernels.verify("strict", target, drafts, nd)
    with pytest.raises(ValueError, match="draft_logits"):
        kernels.verify("ratio", target, drafts, nd, seed=1, positions=positions)
    with pytest.raises(ValueError, match="mode"):
        kernels.verify("beam", target, drafts, nd, seed=1, positions=positions)
    with pytest.raises(ValueError, match="backend"):
        kernels.verify("greedy", target, drafts, nd, backend="cuda")
    with pytest.raises(ValueError, match="draft_tokens"):
        kernels.greedy_verify(target, drafts[:, :1], nd)
    with pytest.raises(ValueError, match="draft_tokens"):
        tv.greedy_verify(target, drafts[:, :1], nd)


def test_forced_triton_unavailable_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_triton():
        raise ImportError("No module named 'triton'")

    monkeypatch.setattr(dispatch, "_import_triton_backend", no_triton)
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    assert not kernels.triton_available()
    assert kernels.select_backend("cuda") == "torch"  # auto: quietly falls back
    target, drafts, nd, _ = _tiny_batch()
    monkeypatch.setenv(kernels.ENV_VAR, "triton")
    with pytest.raises(RuntimeError, match="Triton cannot be imported.*pip install triton"):
        kernels.select_backend("cuda")
    with pytest.raises(RuntimeError, match="Triton cannot be imported"):
        kernels.verify("greedy", target, drafts, nd)


def test_forced_triton_on_cpu_needs_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(kernels.ENV_VAR, "triton")
    monkeypatch.setattr(tv, "interpreter_active", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.select_backend("cpu")
    assert kernels.select_backend("cuda") == "triton"  # a GPU needs no interpreter

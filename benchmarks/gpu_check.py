"""One GPU check for dflash-hf: verify kernels at real shapes, their bandwidth, and DFlash end to end on an 8B shape.

    python benchmarks/gpu_check.py [--out DIR] [--hbm-peak-tbs 3.35]    # one H100/H200; sized for under 8 minutes
    python benchmarks/gpu_check.py --dry-run                            # CPU, tiny shapes, TRITON_INTERPRET=1

Prints one table (and writes it as JSON to --out, default $OUT if set, else ./gpu_check_out):

1. kernel rows: every fused Triton verifier (greedy, strict, ratio, and the keyed sampler the sampling paths use)
   against the pure-torch reference on bf16 logits [R, 16, 151936] for R = 1, 8, 64, with ragged rows and planted
   wrong drafts. Accepted counts and tokens must be EQUAL (every output is int64: there is no float output whose
   error could be reported). Time: CUDA events, warmup, L2 flushed, median of N. Bandwidth = bytes of logits read /
   kernel time, as a % of HBM peak (from the device name: H100 SXM 3.35 TB/s, H200 4.8 TB/s; else --hbm-peak-tbs).
2. end-to-end rows: a Qwen3-8B-shaped random-weight target (bf16, and float32 as the token-for-token control),
   greedy, batch 1, 256 new tokens, eager: plain ``generate`` against DFlash with a SCRIPTED drafter (the real
   drafter forward runs, so its cost is timed, but the proposals are the target's own greedy continuation with one
   wrong draft at planned block slots, mean acceptance length 6.5 at block 16). Outputs must equal plain generate's.
   dflash-hf offers no static-cache / torch.compile option, so that row says so.

Exit status 0 when every correctness column passes, 1 otherwise (the table is printed and saved either way).
"""

from __future__ import annotations

import os
import sys

# TRITON_INTERPRET is read once, at triton's first import (importing transformers or torch._dynamo may trigger it):
# a dry run must set it before anything else is imported.
DRY_RUN = "--dry-run" in sys.argv[1:]
if DRY_RUN:
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["DFLASH_HF_VERIFY"] = "triton"  # the decode loop runs the interpreted kernels too: same code paths

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable, Iterator, Sequence  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

# ---------------------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------------------

KERNEL_MODES = ("greedy", "strict", "ratio", "sample")
# Wrong-draft slot (1-based) of each verify step, cycled; None = every draft right. A wrong draft at slot s accepts
# s - 1 drafts, so the step's acceptance length (drafts accepted + the target's token) is s; None gives the block
# size. At block 16: (3 + 10 + 16 + 1 + 2 + 7) / 6 = 6.5.
ERROR_PLAN: tuple[int | None, ...] = (3, 10, None, 1, 2, 7)
SEED = 1234


@dataclass(frozen=True)
class TargetShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int


QWEN3_8B = TargetShape(hidden=4096, layers=36, heads=32, kv_heads=8, head_dim=128, intermediate=12288, vocab=151936)
TINY = TargetShape(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab=512)


@dataclass
class Settings:
    device: str
    batches: tuple[int, ...]
    block: int
    vocab: int
    warmup: int
    reps: int
    ref_reps: int
    flush_l2: bool
    target: TargetShape
    drafter_layers: int
    prompt_len: int
    new_tokens: int
    e2e_dtypes: tuple[str, ...]
    e2e_repeats: int
    hbm_peak_tbs: float | None
    out: Path
    skip_kernels: bool = False
    skip_e2e: bool = False


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv: Sequence[str] | None = None) -> Settings:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton interpreter: checks the script")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu_check_out"),
                    help="folder for gpu_check.json (default: $OUT if set, else ./gpu_check_out)")
    ap.add_argument("--hbm-peak-tbs", type=float, default=None,
                    help="HBM peak in TB/s (default from the device name: H100 SXM 3.35, H200 4.8)")
    ap.add_argument("--batches", default=None, help="kernel batch sizes (default 1,8,64; dry run 1,4)")
    ap.add_argument("--reps", type=int, default=None, help="timed kernel calls per case (default 50)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed kernel calls first (default 10)")
    ap.add_argument("--ref-reps", type=int, default=None, help="timed torch-reference calls per case (default 3)")
    ap.add_argument("--no-flush-l2", action="store_true", help="keep L2 warm between timed kernel calls")
    ap.add_argument("--new-tokens", type=int, default=None, help="end to end: new tokens (default 256; dry run 40)")
    ap.add_argument("--e2e-dtypes", default="bf16,fp32", help="end-to-end target dtypes (default bf16,fp32)")
    ap.add_argument("--e2e-repeats", type=int, default=None, help="timed generate calls per method (default 3)")
    ap.add_argument("--drafter-layers", type=int, default=None,
                    help="layers of the (random, scripted) drafter whose forward is timed (default 5, as z-lab's "
                         "8B drafters; dry run 1)")
    ap.add_argument("--skip-kernels", action="store_true")
    ap.add_argument("--skip-e2e", action="store_true")
    a = ap.parse_args(argv)
    dry = a.dry_run

    def pick(value: Any, real: Any, tiny: Any) -> Any:
        return value if value is not None else (tiny if dry else real)

    dtypes = tuple(d for d in a.e2e_dtypes.split(",") if d)
    for d in dtypes:
        if d not in DTYPES:
            ap.error(f"--e2e-dtypes: unknown dtype {d!r} (choose from {', '.join(DTYPES)})")
    batches = a.batches or ("1,4" if dry else "1,8,64")
    return Settings(
        device="cpu" if dry else "cuda",
        batches=tuple(int(b) for b in batches.split(",") if b),
        block=16,
        vocab=TINY.vocab if dry else QWEN3_8B.vocab,
        warmup=pick(a.warmup, 10, 0),
        reps=pick(a.reps, 50, 1),
        ref_reps=pick(a.ref_reps, 3, 1),
        flush_l2=not a.no_flush_l2 and not dry,
        target=TINY if dry else QWEN3_8B,
        drafter_layers=pick(a.drafter_layers, 5, 1),
        prompt_len=32,
        new_tokens=pick(a.new_tokens, 256, 40),
        e2e_dtypes=dtypes,
        e2e_repeats=pick(a.e2e_repeats, 3, 1),
        hbm_peak_tbs=a.hbm_peak_tbs,
        out=a.out,
        skip_kernels=a.skip_kernels,
        skip_e2e=a.skip_e2e,
    )


# ---------------------------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Row:
    part: str  # "kernel" or "e2e"
    case: str
    correct: str  # "exact", "near-tie@i (...)", "MISMATCH ...", "reference", "-"
    ok: bool
    time_ms: float | None = None
    rate: float | None = None  # GB/s (kernel) or tokens/s (e2e)
    rate_unit: str = ""
    pct_peak: float | None = None
    speedup: float | None = None
    acceptance: float | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: Sequence[Row]) -> str:
    head = ["part", "case", "correct", "time ms", "rate", "% HBM peak", "speedup", "accept len", "note"]
    body = [[r.part, r.case, r.correct, _fmt(r.time_ms, ".3f"),
             "-" if r.rate is None else f"{r.rate:.4g} {r.rate_unit}", _fmt(r.pct_peak, ".1f"),
             "-" if r.speedup is None else f"{r.speedup:.2f}x", _fmt(r.acceptance, ".2f"), r.note] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    line = lambda cells: " | ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), "-+-".join("-" * w for w in widths), *(line(b) for b in body)])


def save(settings: Settings, meta: dict[str, Any], rows: Sequence[Row]) -> Path:
    settings.out.mkdir(parents=True, exist_ok=True)
    path = settings.out / "gpu_check.json"
    payload = {"meta": meta, "ok": all(r.ok for r in rows), "rows": [asdict(r) for r in rows],
               "table": format_table(rows)}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Machine facts
# ---------------------------------------------------------------------------------------------------------------


def hbm_peak_tbs(device_name: str, override: float | None) -> float | None:
    """HBM peak in TB/s: the override, else known from the name (H200 4.8; H100 SXM 3.35), else None."""
    if override is not None:
        return override
    name = device_name.upper()
    if "H200" in name:
        return 4.8
    if "H100" in name and "PCIE" not in name and "NVL" not in name:
        return 3.35
    return None


def machine_meta(settings: Settings) -> dict[str, Any]:
    import transformers
    import triton

    if settings.device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        from dflash_hf.machine import cpu_facts

        name = f"CPU: {cpu_facts()['cpu_model']} (dry run, TRITON_INTERPRET=1)"
    return {
        "device": name,
        "hbm_peak_tbs": hbm_peak_tbs(name, settings.hbm_peak_tbs) if settings.device == "cuda" else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "dry_run": settings.device == "cpu",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items()},
    }


# ---------------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------------


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], Any], warmup: int, reps: int, device: str, flush: torch.Tensor | None) -> float:
    """Median milliseconds per call: CUDA events around each call on a GPU (L2 flushed first if ``flush``),
    perf_counter on the CPU."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(max(1, reps)):
        if flush is not None:
            flush.zero_()
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------------------------
# 1. Kernels against the reference
# ---------------------------------------------------------------------------------------------------------------


def plant_errors(choice: torch.Tensor, wrong_slot: torch.Tensor, vocab: int) -> torch.Tensor:
    """choice [R, D] with the draft at 0-based slot wrong_slot[r] replaced by another token (slot D: none wrong)."""
    slots = torch.arange(choice.shape[1], device=choice.device)
    wrong = slots[None, :] == wrong_slot[:, None]
    return torch.where(wrong, (choice + 1) % vocab, choice)


def kernel_case(mode: str, R: int, T: int, V: int, device: str) -> dict[str, Any]:
    """Random bf16 logits [R, T, V]; ragged rows (row 0 all T-1 drafts, row 1 none, the rest random); drafts equal
    to the target's own choice with one planted wrong draft per row (ratio: drafts sampled from the drafter's q)."""
    from dflash_hf.kernels import STREAM_DRAFT, STREAM_TARGET, reference

    g = torch.Generator(device=device).manual_seed(SEED + R)
    target = (3.0 * torch.randn(R, T, V, generator=g, device=device)).to(torch.bfloat16)
    num_drafts = torch.randint(0, T, (R,), generator=g, device=device)
    num_drafts[0] = T - 1
    if R > 1:
        num_drafts[1] = 0
    positions = torch.randint(0, 30000, (R,), generator=g, device=device)
    wrong_slot = torch.randint(0, T, (R,), generator=g, device=device)  # T - 1: no wrong draft in that row
    wrong_slot[0] = (T - 1) // 2
    case: dict[str, Any] = {"target": target, "num_drafts": num_drafts, "positions": positions, "seed": SEED}
    if mode == "greedy":
        case["drafts"] = plant_errors(target[:, : T - 1].float().argmax(-1), wrong_slot, V)
    elif mode == "strict":
        choice = reference.sample_keyed(target, SEED, positions, STREAM_TARGET)[:, : T - 1]
        case["drafts"] = plant_errors(choice, wrong_slot, V)
    elif mode == "ratio":
        noise = 0.5 * torch.randn(R, T - 1, V, generator=g, device=device)
        case["draft_logits"] = (target[:, : T - 1].float() + noise).to(torch.bfloat16)
        case["drafts"] = reference.sample_keyed(case["draft_logits"], SEED, positions, STREAM_DRAFT)
    return case


def kernel_call(mode: str, case: dict[str, Any], backend: str) -> Callable[[], tuple[torch.Tensor, ...]]:
    """The public dispatching API of dflash_hf.kernels, forced to one backend."""
    from dflash_hf import kernels as K

    t, n, p, s = case["target"], case["num_drafts"], case["positions"], case["seed"]
    if mode == "greedy":
        return lambda: K.greedy_verify(t, case["drafts"], n, backend=backend)
    if mode == "strict":
        return lambda: K.strict_verify(t, case["drafts"], n, s, p, backend=backend)
    if mode == "ratio":
        return lambda: K.ratio_verify(t, case["draft_logits"], case["drafts"], n, s, p, backend=backend)
    return lambda: (K.sample_keyed(t, s, p, K.STREAM_DRAFT, backend=backend),)


def logit_bytes(mode: str, R: int, T: int, V: int) -> int:
    """Bytes of bf16 logits a verifier must read at least once: target [R, T, V] (+ draft [R, T-1, V] for ratio)."""
    rows = R * T + (R * (T - 1) if mode == "ratio" else 0)
    return rows * V * 2


def compare_outputs(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> tuple[bool, str]:
    """(equal, verdict): every output tensor equal, and how many rows differ if not."""
    if len(got) != len(want) or any(a.shape != b.shape for a, b in zip(got, want)):
        return False, "MISMATCH (shapes)"
    bad = torch.zeros(want[0].shape[0], dtype=torch.bool, device=want[0].device)
    for a, b in zip(got, want):
        bad |= (a.reshape(a.shape[0], -1) != b.reshape(b.shape[0], -1)).any(dim=1)
    n_bad = int(bad.sum())
    return (True, "exact") if n_bad == 0 else (False, f"MISMATCH ({n_bad}/{bad.numel()} rows)")


def kernel_row(mode: str, R: int, settings: Settings, peak_tbs: float | None, flush: torch.Tensor | None) -> Row:
    T, V, dev = settings.block, settings.vocab, settings.device
    case = kernel_case(mode, R, T, V, dev)
    fast, ref = kernel_call(mode, case, "triton"), kernel_call(mode, case, "torch")
    want = ref()
    got = fast()
    ok, verdict = compare_outputs(got, want)
    kernel_ms = median_ms(fast, settings.warmup, settings.reps, dev, flush)
    ref_ms = median_ms(ref, 1, settings.ref_reps, dev, flush)
    gbps = logit_bytes(mode, R, T, V) / (kernel_ms * 1e-3) / 1e9
    if mode == "sample":
        what = "sampled tokens"
    else:
        what = f"mean accepted {want[0].float().mean().item():.2f}/{T - 1}"
    return Row(
        part="kernel", case=f"{mode} R={R} T={T} V={V} bf16", correct=verdict, ok=ok, time_ms=kernel_ms,
        rate=gbps, rate_unit="GB/s", pct_peak=None if peak_tbs is None else 100 * gbps / (peak_tbs * 1e3),
        speedup=ref_ms / kernel_ms, note=f"vs torch ref {ref_ms:.3f} ms; {what}",
        extra={"ref_ms": ref_ms, "bytes": logit_bytes(mode, R, T, V), "mode": mode, "batch": R},
    )


def kernel_rows(settings: Settings, peak_tbs: float | None) -> Iterator[Row]:
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda") if settings.flush_l2 else None
    for mode in KERNEL_MODES:
        for R in settings.batches:
            yield kernel_row(mode, R, settings, peak_tbs, flush)
            if settings.device == "cuda":
                torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------------
# 2. End to end: random-weight target, scripted drafter
# ---------------------------------------------------------------------------------------------------------------


def planned_acceptance(plan: Sequence[int | None], block: int) -> float:
    return sum(block if s is None else s for s in plan) / len(plan)


@contextmanager
def fast_build(device: str, dtype: torch.dtype) -> Iterator[None]:
    """Parameters allocated directly on ``device`` in ``dtype``, with every weight-init routine skipped."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers 5.x releases
        from transformers.modeling_utils import no_init_weights
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with no_init_weights(), torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


@torch.no_grad()
def fill_random_(model: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    """Seeded random weights in place (normal(0, std); norm weights 1), as fast as the device writes."""
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    for name, param in model.named_parameters():
        if "norm" in name:
            param.fill_(1.0)
        else:
            param.normal_(0.0, std, generator=g)


def build_target(shape: TargetShape, dtype: torch.dtype, device: str) -> torch.nn.Module:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim, max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=False,
        eos_token_id=None, pad_token_id=None, bos_token_id=None,
    )
    with fast_build(device, dtype):
        target = Qwen3ForCausalLM(config)
    fill_random_(target, SEED)
    target.eval()
    target.generation_config.eos_token_id = None
    target.generation_config.pad_token_id = None
    return target


def build_drafter(target: torch.nn.Module, layers: int, block: int, dtype: torch.dtype, device: str) -> Any:
    import dflash_hf

    with fast_build(device, dtype):
        drafter = dflash_hf.DFlashDraftModel.from_target(target, num_hidden_layers=layers, block_size=block)
    fill_random_(drafter, SEED + 1)
    return drafter.eval()


class ScriptedDrafts:
    """Stands in for the drafter's proposals: the real drafter forward still runs (its cost stays in the timing and
    the draft cache stays real), then its logits are replaced by a one-hot of ``reference`` (the target's greedy
    sequence) at the block's positions, with the draft at the plan's slot for this step made wrong."""

    def __init__(self, reference: torch.Tensor, plan: Sequence[int | None], vocab: int) -> None:
        self.reference = reference.reshape(-1)  # [L] prompt + continuation
        self.plan = tuple(plan)
        self.vocab = vocab
        self.steps = 0

    def propose(self, original: Callable[..., torch.Tensor], session: Any, *args: torch.Tensor) -> torch.Tensor:
        logits = original(session, *args)  # [R, n, V]
        anchor_position = args[1].to(self.reference.device)  # [R]: position of the block's first token
        n = logits.shape[1]
        offsets = torch.arange(1, n + 1, device=anchor_position.device)
        positions = (anchor_position[:, None] + offsets).clamp(max=self.reference.shape[0] - 1)
        truth = self.reference[positions]  # [R, n], no host sync
        slot = self.plan[self.steps % len(self.plan)]
        self.steps += 1
        if slot is not None and slot <= n:
            truth[:, slot - 1] = (truth[:, slot - 1] + 1) % self.vocab
        return torch.full_like(logits, -1.0).scatter_(-1, truth[..., None].to(logits.device), 1.0)


@contextmanager
def scripted(script: ScriptedDrafts) -> Iterator[ScriptedDrafts]:
    from dflash_hf.core.draft_dflash import DraftSession

    original = DraftSession.propose
    DraftSession.propose = lambda session, *a: script.propose(original, session, *a)
    try:
        yield script
    finally:
        DraftSession.propose = original


def timed_generate(target: torch.nn.Module, prompt: torch.Tensor, new_tokens: int, device: str,
                   **kwargs: Any) -> tuple[Any, float]:
    sync(device)
    t0 = time.perf_counter()
    out = target.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                          do_sample=False, **kwargs)
    sync(device)
    return out, time.perf_counter() - t0


def ulp(value: float, dtype: torch.dtype) -> float:
    """The spacing of ``dtype`` numbers at ``value``."""
    exponent = torch.floor(torch.log2(torch.tensor(abs(value) or torch.finfo(dtype).tiny, dtype=torch.float64)))
    return float(2.0 ** exponent) * torch.finfo(dtype).eps


def judge_e2e(plain: torch.Tensor, dflash: torch.Tensor, plain_logits: Sequence[torch.Tensor] | None,
              prompt_len: int, dtype: torch.dtype) -> tuple[bool, str]:
    """(ok, verdict) of a DFlash output against plain generate's. 'exact', or at the first differing token the
    gap between the two tokens in plain's own logits: within 2 ulps in bf16/fp16 is the documented near-tie
    ("Lossless, per dtype" in the README), anything else is a failure."""
    if plain.shape == dflash.shape and torch.equal(plain, dflash):
        return True, "exact"
    n = min(plain.shape[1], dflash.shape[1])
    differ = (plain[0, :n] != dflash[0, :n]).nonzero()
    if differ.numel() == 0:
        return False, f"MISMATCH (lengths {plain.shape[1]} vs {dflash.shape[1]})"
    at = int(differ[0]) - prompt_len
    if plain_logits is None or not 0 <= at < len(plain_logits):
        return False, f"MISMATCH@{at}"
    row = plain_logits[at][0].float()
    a, b = float(row[plain[0, prompt_len + at]]), float(row[dflash[0, prompt_len + at]])
    ulps = (a - b) / ulp(a, dtype)
    near = ulps <= 2 and dtype in (torch.bfloat16, torch.float16)
    return near, f"{'near-tie' if near else 'MISMATCH'}@{at} ({ulps:.1f} ulp)"


@dataclass
class E2ECase:
    """One random target with its drafter and prompt."""

    target: torch.nn.Module
    drafter: Any
    prompt: torch.Tensor
    dtype: torch.dtype
    device: str
    new_tokens: int
    repeats: int
    vocab: int
    build_s: float


@dataclass
class PlainResult:
    reference: torch.Tensor  # [1, P + n] plain generate's sequence
    logits: tuple[torch.Tensor, ...]  # its raw logits per new token (float32 copies of the model's values)
    times: list[float]
    stable: bool  # every timed run returned the reference


@dataclass
class DFlashResult:
    times: list[float]
    acceptance: list[float]
    steps: list[int]
    verdicts: list[tuple[bool, str]]  # the untimed run's, then each timed run's
    backend: str


def make_e2e_case(settings: Settings, dtype_name: str) -> E2ECase:
    from transformers import Qwen3ForCausalLM  # noqa: F401  (the import is not part of the build time)

    t0 = time.perf_counter()
    dtype, dev = DTYPES[dtype_name], settings.device
    target = build_target(settings.target, dtype, dev)
    drafter = build_drafter(target, settings.drafter_layers, settings.block, dtype, dev)
    g = torch.Generator(device="cpu").manual_seed(SEED)
    prompt = torch.randint(0, settings.target.vocab, (1, settings.prompt_len), generator=g).to(dev)
    return E2ECase(target, drafter, prompt, dtype, dev, settings.new_tokens, settings.e2e_repeats,
                   settings.target.vocab, time.perf_counter() - t0)


def run_plain(case: E2ECase) -> PlainResult:
    """One untimed run that returns its logits (the reference, and the warmup), then the timed runs."""
    first = case.target.generate(case.prompt, attention_mask=torch.ones_like(case.prompt),
                                 max_new_tokens=case.new_tokens, do_sample=False, return_dict_in_generate=True,
                                 output_logits=True)
    times, stable = [], True
    for _ in range(case.repeats):
        out, seconds = timed_generate(case.target, case.prompt, case.new_tokens, case.device)
        times.append(seconds)
        stable &= torch.equal(out, first.sequences)
    return PlainResult(first.sequences, first.logits, times, stable)


def run_dflash(case: E2ECase, plain: PlainResult) -> DFlashResult:
    """One untimed run scripted on plain's output (it also compiles the kernels), then the timed runs scripted on
    that run's output, so the planned acceptance holds even after a bf16 near-tie. Every run is judged."""
    judge = lambda out: judge_e2e(plain.reference, out, plain.logits, case.prompt.shape[1], case.dtype)  # noqa: E731

    def generate(reference: torch.Tensor) -> tuple[torch.Tensor, float]:
        with scripted(ScriptedDrafts(reference, ERROR_PLAN, case.vocab)):
            return timed_generate(case.target, case.prompt, case.new_tokens, case.device,
                                  assistant_model=case.drafter)

    first, _ = generate(plain.reference)
    result = DFlashResult([], [], [], [judge(first)], case.drafter.last_stats.verify_backend)
    for _ in range(case.repeats):
        out, seconds = generate(first)
        stats = case.drafter.last_stats
        result.times.append(seconds)
        result.acceptance.append(stats.mean_acceptance_length)
        result.steps.append(len(stats.acceptance_lengths))
        result.verdicts.append(judge(out))
    return result


def e2e_label(settings: Settings, dtype_name: str) -> str:
    shape = settings.target
    return (f"Qwen3 {shape.layers}L h{shape.hidden} V{shape.vocab} {dtype_name}, batch 1, {settings.new_tokens} "
            "new, greedy, eager")


def plain_row(label: str, case: E2ECase, plain: PlainResult) -> Row:
    seconds = statistics.median(plain.times)
    return Row(
        part="e2e", case=f"plain generate | {label}", correct="reference" if plain.stable else "UNSTABLE",
        ok=plain.stable, time_ms=1e3 * seconds, rate=case.new_tokens / seconds, rate_unit="tok/s", speedup=1.0,
        note=f"median of {len(plain.times)}; model built in {case.build_s:.1f} s"
             + ("" if plain.stable else "; timed runs differ from the reference run"),
        extra={"seconds": plain.times},
    )


def dflash_row(label: str, settings: Settings, case: E2ECase, plain: PlainResult, result: DFlashResult) -> Row:
    seconds, steps = statistics.median(result.times), statistics.median(result.steps)
    verdicts = list(dict.fromkeys(v for _, v in result.verdicts))
    return Row(
        part="e2e", case=f"DFlash scripted | {label}", correct=" / ".join(verdicts),
        ok=all(ok for ok, _ in result.verdicts), time_ms=1e3 * seconds, rate=case.new_tokens / seconds,
        rate_unit="tok/s", speedup=statistics.median(plain.times) / seconds,
        acceptance=statistics.median(result.acceptance),
        note=(f"median of {len(result.times)}; {steps:.0f} verify steps, {1e3 * seconds / steps:.2f} ms/step; "
              f"verify backend {result.backend}; planned acceptance "
              f"{planned_acceptance(ERROR_PLAN, settings.block):.2f}; {settings.drafter_layers}-layer drafter "
              "forward timed"),
        extra={"seconds": result.times, "acceptance": result.acceptance, "steps": result.steps,
               "verify_backend": result.backend, "verdicts": [v for _, v in result.verdicts]},
    )


def e2e_rows(settings: Settings, dtype_name: str) -> list[Row]:
    """Plain generate and scripted DFlash on one random target; the models are freed afterwards."""
    import dflash_hf  # noqa: F401  (installs the generate patch)

    case = make_e2e_case(settings, dtype_name)
    plain = run_plain(case)
    result = run_dflash(case, plain)
    label = e2e_label(settings, dtype_name)
    rows = [plain_row(label, case, plain), dflash_row(label, settings, case, plain, result)]
    del case, plain
    gc.collect()
    if settings.device == "cuda":
        torch.cuda.empty_cache()
    return rows


STATIC_COMPILE_ROW = Row(
    part="e2e", case="DFlash static cache + torch.compile", correct="-", ok=True,
    note="not offered: dflash-hf has no static-cache / torch.compile option (nothing to time)",
)


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------


def check_environment(settings: Settings) -> str | None:
    """A sentence saying why this run cannot go ahead, or None."""
    if settings.device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device: run this on an H100/H200, or pass --dry-run for the CPU check of the script"
    try:
        from dflash_hf.kernels import triton_verify
    except ImportError as exc:
        return f"the Triton kernels cannot be imported ({exc}); install triton"
    if settings.device == "cpu" and not triton_verify.interpreter_active():
        return "TRITON_INTERPRET=1 did not take effect (triton was imported before this script set it)"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    problem = check_environment(settings)
    if problem:
        print(f"gpu_check: {problem}", file=sys.stderr)
        return 2
    # The residual pass takes log(0) = -inf on purpose; the interpreter (numpy) warns about it.
    warnings.filterwarnings("ignore", "divide by zero encountered in log", RuntimeWarning)
    started = time.perf_counter()
    meta = machine_meta(settings)
    peak = meta["hbm_peak_tbs"]
    print(f"device: {meta['device']}   HBM peak: {'unknown (pass --hbm-peak-tbs)' if peak is None else f'{peak} TB/s'}")
    print(f"torch {meta['torch']} (CUDA {meta['cuda']})   triton {meta['triton']}   "
          f"transformers {meta['transformers']}   python {meta['python']}", flush=True)

    rows: list[Row] = []
    if not settings.skip_kernels:
        for row in kernel_rows(settings, peak):
            rows.append(row)
            print(f"  {row.case}: {row.correct}, {row.time_ms:.3f} ms", flush=True)
        save(settings, meta, rows)
    if not settings.skip_e2e:
        for dtype_name in settings.e2e_dtypes:
            for row in e2e_rows(settings, dtype_name):
                rows.append(row)
                print(f"  {row.case}: {row.correct}, {row.time_ms / 1e3:.2f} s", flush=True)
            save(settings, meta, rows)
        rows.append(STATIC_COMPILE_ROW)

    meta["wall_s"] = time.perf_counter() - started
    path = save(settings, meta, rows)
    ok = all(r.ok for r in rows)
    print()
    print(format_table(rows))
    print()
    print("kernel rows: speedup = torch reference time / kernel time; every kernel output is int64 (accepted counts,"
          " tokens), so equality is the whole check and there is no float error to report")
    print(f"e2e rows: speedup = plain generate time / DFlash time; scripted wrong-draft slots per step {ERROR_PLAN} "
          f"(None: all right), planned mean acceptance length {planned_acceptance(ERROR_PLAN, settings.block):.2f}")
    print(f"all correct: {ok}   wall {meta['wall_s']:.1f} s   wrote {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

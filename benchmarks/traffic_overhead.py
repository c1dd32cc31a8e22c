"""Cost of traffic recording per generate call: the same DFlash calls with and without ``record_traffic``.

Calls alternate (plain, recorded, recorded, plain, ...) so that load on the machine hits both alike. Two numbers:
the difference of the median call times (noisy: the calls themselves vary), and the time spent in the recorder
itself, which is what recording adds: its hook on every call, plus one shard write (atomic, fsync'd) every
``calls/shard`` calls. "recorder %" is both, per call, over the median plain call.

    python benchmarks/traffic_overhead.py [--pair default|tiny|both] [--new-tokens 64] [--repeats 8] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

import dflash_hf
from dflash_hf.machine import cpu_facts
from dflash_hf.training.traffic import TrafficRecorder

PROMPTS = [
    "Write a Python function that checks whether a string is a palindrome.",
    "Explain in two sentences why the sky is blue.",
    "Give me three tips for a job interview.",
    "What is the capital of Australia, and why is it not Sydney?",
]


def default_pair_requests(rows: int) -> tuple:
    from dflash_hf.training.data import chat_prompt_ids

    target, tokenizer, drafter = dflash_hf.load_default_pair()
    encoded = [chat_prompt_ids(tokenizer, p) for p in PROMPTS[:rows]]
    return target, drafter, *left_pad(encoded, tokenizer.eos_token_id)


def tiny_pair_requests(rows: int) -> tuple:
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                         eos_token_id=None, pad_token_id=None, bos_token_id=None)
    target = Qwen3ForCausalLM(config).eval()
    target.generation_config.eos_token_id = target.generation_config.pad_token_id = None
    drafter = dflash_hf.DFlashDraftModel.from_target(target, num_hidden_layers=1, block_size=8).eval()
    g = torch.Generator().manual_seed(1)
    encoded = [torch.randint(0, 256, (12 + 3 * r,), generator=g).tolist() for r in range(rows)]
    return target, drafter, *left_pad(encoded, 0)


def left_pad(encoded: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(e) for e in encoded)
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    return ids, mask


class TimedRecorder(TrafficRecorder):
    """A recorder that adds up the time spent in it: in its per-call hook, and in shard writes apart."""

    hook_s = 0.0
    write_s = 0.0
    written_bytes = 0

    def record_call(self, *args, **kwargs) -> None:
        t0 = time.perf_counter()
        write_before = self.write_s
        super().record_call(*args, **kwargs)
        self.hook_s += time.perf_counter() - t0 - (self.write_s - write_before)

    def _flush_locked(self) -> None:
        t0 = time.perf_counter()
        self.written_bytes += self._buffered
        super()._flush_locked()
        self.write_s += time.perf_counter() - t0


def measure(target, drafter, ids, mask, new_tokens: int, repeats: int) -> dict:
    kwargs = dict(attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, assistant_model=drafter)
    target.generate(ids, **kwargs)  # warm-up
    plain, recorded = [], []
    with tempfile.TemporaryDirectory() as folder:
        recorder = TimedRecorder(folder)
        for i in range(2 * repeats):
            record = i % 4 in (1, 2)  # plain, recorded, recorded, plain, ...
            drafter.traffic_recorder = recorder if record else None
            t0 = time.perf_counter()
            out = target.generate(ids, **kwargs)
            (recorded if record else plain).append(time.perf_counter() - t0)
            if record:
                reference = out
            elif i > 0:
                assert torch.equal(out, reference), "recording changed the output"
        del drafter.traffic_recorder
        recorder.close()  # one shard: what a full shard's write costs is timed here
    median_plain, median_recorded = statistics.median(plain), statistics.median(recorded)
    bytes_per_call = recorder.written_bytes / recorder.calls
    calls_per_shard = recorder.shard_bytes / bytes_per_call
    # A shard is written every calls_per_shard calls; the write of this run's one (smaller) shard stands for it.
    write_per_call = recorder.write_s / calls_per_shard
    per_call = recorder.hook_s / recorder.calls + write_per_call
    return dict(rows=ids.shape[0], plain_ms=1e3 * median_plain, recorded_ms=1e3 * median_recorded,
                difference_pct=100 * (median_recorded - median_plain) / median_plain,
                hook_us=1e6 * recorder.hook_s / recorder.calls, write_ms=1e3 * recorder.write_s,
                calls_per_shard=calls_per_shard, recorder_pct=100 * per_call / median_plain)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", choices=("default", "tiny", "both"), default="both")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = cpu_facts()
    print(f"cpu: {cpu['cpu_model']} (family {cpu['cpu_family']} model {cpu['cpu_model_number']}, "
          f"{cpu['logical_cpus']} logical CPUs); torch {torch.__version__}; threads {torch.get_num_threads()}")
    print(f"{'pair':>8} {'rows':>4} {'plain ms':>9} {'recorded ms':>12} {'difference':>10} {'hook us/call':>13} "
          f"{'shard write ms':>15} {'calls/shard':>12} {'recorder %':>11}")
    pairs = ("default", "tiny") if args.pair == "both" else (args.pair,)
    for name in pairs:
        for rows in (1, 4):
            requests = default_pair_requests(rows) if name == "default" else tiny_pair_requests(rows)
            r = measure(*requests, args.new_tokens, args.repeats)
            print(f"{name:>8} {r['rows']:>4} {r['plain_ms']:>9.1f} {r['recorded_ms']:>12.1f} "
                  f"{r['difference_pct']:>9.2f}% {r['hook_us']:>13.1f} {r['write_ms']:>15.2f} "
                  f"{r['calls_per_shard']:>12.0f} {r['recorder_pct']:>10.4f}%")

if __name__ == "__main__":
    main()

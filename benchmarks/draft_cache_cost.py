"""What the draft cache's storage saves: one draft forward with appends into spare room against concatenation.

``DraftCache`` appends a step's new context keys/values into per-layer storage with room to spare and writes the
block's keys/values after them, so attention reads one view. The way it was before, each layer concatenated the
cache with the new entries and then the whole context with the block: copies that grow with the context. This
decodes the same prompts with both (the old way as a ``DraftCache`` subclass), interleaved, and prints the mean
drafter forward per step (the prefill's draft left out), medians over calls, at a short and at a long context (the
bench prompts repeated). The outputs must be equal.

    python benchmarks/draft_cache_cost.py [--num-prompts 3] [--long-repeats 180] [--rounds 4]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

import dflash_hf.core.generation_dflash as loop
from dflash_hf.core.cache_dflash import DraftCache
from dflash_hf.machine import describe_cpu
from dflash_hf.tools.bench import load_prompt_file
from dflash_hf.training.data import chat_prompt_ids
from dflash_hf.training.default_pair import load_default_pair


class ConcatenatingCache(DraftCache):
    """The draft cache as it was: every append and every block concatenates the whole context."""

    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
               room: int = 0) -> None:
        if layer == len(self.keys):
            self.keys.append(keys)
            self.values.append(values)
            self.positions.append(positions)
        elif keys.shape[2]:
            self.keys[layer] = torch.cat((self.keys[layer], keys), dim=2)
            self.values[layer] = torch.cat((self.values[layer], values), dim=2)
            self.positions[layer] = torch.cat((self.positions[layer], positions), dim=1)

    def with_block(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat((self.keys[layer], keys), dim=2), torch.cat((self.values[layer], values), dim=2)


CACHES = {"storage (now)": DraftCache, "concatenation (before)": ConcatenatingCache}


def draft_forward_ms(target: Any, tokenizer: Any, drafter: Any, prompts: list[str], rounds: int,
                     max_new_tokens: int) -> tuple[dict[str, float], int]:
    """Median over generate calls of the mean drafter forward (ms) per cache kind, and the longest prompt."""
    chosen: dict[str, type] = {}
    session_init = loop.DraftSession.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        session_init(self, *args, **kwargs)
        self.cache = chosen["cache"]()

    spent: list[float] = []
    forward = drafter.forward

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return forward(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - start)

    loop.DraftSession.__init__ = init
    drafter.forward = timed
    per_call: dict[str, list[float]] = {name: [] for name in CACHES}
    outputs: dict[int, torch.Tensor] = {}
    longest = 0
    try:
        for turn in range(rounds):
            names = list(CACHES) if turn % 2 == 0 else list(reversed(CACHES))
            for name in names:
                chosen["cache"] = CACHES[name]
                for i, prompt in enumerate(prompts):
                    ids = torch.tensor([chat_prompt_ids(tokenizer, prompt)])
                    longest = max(longest, ids.shape[1])
                    spent.clear()
                    out = target.generate(ids, assistant_model=drafter, max_new_tokens=max_new_tokens,
                                          do_sample=False, pad_token_id=tokenizer.eos_token_id)
                    if i in outputs and not torch.equal(outputs[i], out):
                        raise SystemExit(f"prompt {i}: the two caches gave different tokens")
                    outputs[i] = out
                    per_call[name].append(1e3 * statistics.mean(spent[1:]))  # spent[0]: the prefill's draft
    finally:
        loop.DraftSession.__init__ = session_init
        drafter.forward = forward
    return {name: statistics.median(times) for name, times in per_call.items()}, longest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-prompts", type=int, default=3)
    parser.add_argument("--long-repeats", type=int, default=180, help="each prompt repeated this often")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()
    target, tokenizer, drafter = load_default_pair()
    print(f"CPU: {describe_cpu()}; "
          f"{torch.get_num_threads()} threads")
    prompts = load_prompt_file(None, args.num_prompts)
    cases = {"short": prompts, "long": [(p + "\n") * args.long_repeats for p in prompts[:1]]}
    print(f"{'context':<22}" + "".join(f"{name:>26}" for name in CACHES))
    for label, case in cases.items():
        medians, longest = draft_forward_ms(target, tokenizer, drafter, case, args.rounds, args.max_new_tokens)
        print(f"{f'{label}, {longest} tokens':<22}" + "".join(f"{medians[name]:>23.2f} ms" for name in CACHES))


if __name__ == "__main__":
    main()

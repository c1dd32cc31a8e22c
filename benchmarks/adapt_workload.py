"""A simulated deployment for `dflash-hf adapt`: a stream of chat requests served through the traffic recorder.

``--stream code`` (a code assistant) is ShareGPT conversations about code (first human turn matched by
CODE_PATTERN) from the TRAIN split, past the first ``--skip`` conversations of the seeded order `dflash-hf train
--prompts sharegpt` draws from (so none of them trained the shipped drafter, which used the first 704).
``--stream chitchat`` (a social chat app) is Chit-Chat conversations of its train split, a source the shipped
drafter never saw. Each conversation is served as a chat app
would: turn by turn, up to ``--max-turns`` human turns, every later turn sent with the target's own earlier
answers, greedy, ``--max-new-tokens`` per answer, through ``generate(assistant_model=drafter)`` inside
``record_traffic``. Serving stops when ``--budget-min`` minutes of serving have passed (summed over resumed runs)
or the stream ends; a rerun resumes after the last conversation served (``served.json`` in the run folder).

    python benchmarks/adapt_workload.py serve --run /work/runs/code --budget-min 30 [--stream chitchat --skip 0]
    dflash-hf adapt --traffic /work/runs/code/traffic --drafter hub_upload/SmolLM2-135M-Instruct-DFlash \\
        --replay-data /work/runs/sg --out /work/runs/code/adapted
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import dflash_hf
from dflash_hf.fileio import atomic_write_text
from dflash_hf.machine import cpu_facts
from dflash_hf.training.data import chat_ids
from dflash_hf.training.prompt_sources import training_conversations
from dflash_hf.training.traffic import record_traffic

CODE_PATTERN = re.compile(
    r"```|\b(python|javascript|typescript|java|c\+\+|c#|golang|rust|sql|html|css|react|node\.?js|django|flask|"
    r"pandas|numpy|regex|bash|shell script|api|function|compile|debug|code|script|programming)\b",
    re.IGNORECASE,
)


def cpu_line() -> str:
    facts = cpu_facts()
    return f"{facts['cpu_model']} (family {facts['cpu_family']}, model {facts['cpu_model_number']})"


def request_stream(name: str, skip: int, seed: int = 0, max_turns: int = 2) -> list[dict]:
    """The conversations of a stream, in the order `dflash-hf train --prompts SOURCE` draws its source's train
    split (``training_conversations``), past the first ``skip``: ``code`` (ShareGPT conversations whose first turn
    is about code) or ``chitchat`` (Chit-Chat conversations, a source the shipped drafter never trained on)."""
    source = "sharegpt" if name == "code" else "chitchat"
    ordered = training_conversations(source, sys.maxsize, seed=seed, max_turns=max_turns)[skip:]
    return [c for c in ordered if name != "code" or CODE_PATTERN.search(c["turns"][0])]


def serve(args: argparse.Namespace) -> None:
    run = Path(args.run)
    run.mkdir(parents=True, exist_ok=True)
    state_path = run / "served.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {"served": 0, "seconds": 0.0, "calls": 0,
                                                                            "new_tokens": 0}
    stream = request_stream(args.stream, args.skip, max_turns=args.max_turns)
    target, tokenizer, drafter = dflash_hf.load_default_pair()
    print(f"{len(stream)} {args.stream} conversations in the stream; {state['served']} served in {state['seconds'] / 60:.1f} "
          f"min before this run; CPU: {cpu_line()}")
    budget = args.budget_min * 60
    bar = tqdm(total=round(budget), initial=round(state["seconds"]), unit="s", desc="serving (budget)")
    with record_traffic(drafter, run / "traffic") as recorder:
        for conversation in stream[state["served"]:]:
            if state["seconds"] >= budget:
                break
            started = time.perf_counter()
            messages: list[dict] = []
            for turn in conversation["turns"]:
                messages.append({"role": "user", "content": turn})
                ids = torch.tensor([chat_ids(tokenizer, messages)])
                if ids.shape[1] + args.max_new_tokens > args.max_context:
                    break
                out = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                                      do_sample=False, assistant_model=drafter)
                answer = out[0, ids.shape[1]:]
                messages.append({"role": "assistant", "content": tokenizer.decode(answer, skip_special_tokens=True)})
                state["calls"] += 1
                state["new_tokens"] += int(answer.shape[0])
            elapsed = time.perf_counter() - started
            state["served"] += 1
            state["seconds"] += elapsed
            bar.update(round(elapsed))
            bar.set_postfix(conversations=state["served"], tok_s=f"{state['new_tokens'] / state['seconds']:.1f}")
            if state["served"] % args.flush_every == 0:
                recorder.flush()  # the shards first, then the count: a killed run resumes after what was written
                atomic_write_text(state_path, json.dumps(state))
        recorder.flush()
        atomic_write_text(state_path, json.dumps(state))
    bar.close()
    print(json.dumps({**state, "tokens_per_s": round(state["new_tokens"] / max(state["seconds"], 1e-9), 2),
                      "cpu": cpu_line()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="stage", required=True)
    s = sub.add_parser("serve", help="serve the code stream through the recorder for a time budget")
    s.add_argument("--run", required=True, help="run folder (traffic/ and served.json go here)")
    s.add_argument("--budget-min", type=float, default=30.0, help="minutes of serving, summed over resumed runs")
    s.add_argument("--stream", choices=["code", "chitchat"], default="code", help="the deployment's requests")
    s.add_argument("--skip", type=int, default=2000, help="conversations of the train order never served")
    s.add_argument("--max-turns", type=int, default=2)
    s.add_argument("--max-new-tokens", type=int, default=128)
    s.add_argument("--max-context", type=int, default=2048, help="turns that would not fit are not sent")
    s.add_argument("--flush-every", type=int, default=8, help="conversations per traffic shard (and per resume point)")
    args = parser.parse_args()
    serve(args)


if __name__ == "__main__":
    main()

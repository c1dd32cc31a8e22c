"""vLLM serves our drafter: the model card's exact `vllm serve` command, run as a real server on 127.0.0.1.

The shipped drafter is exported as `dflash-hf export` exports it; its card's vLLM command starts a DFlash server
and a plain one (the same command without --speculative-config) on the default target's safetensors folder.
Greedy answers through the OpenAI API must be the same tokens on both servers and in our loop, and the
acceptance length in vLLM's /metrics must equal our loop's on the same prompts. Regeneration for training goes
through the real server too.

vLLM runs from its own venv: `bash scripts/make_vllm_venv.sh` and `export DFLASH_VLLM_PYTHON=.vllm-venv/bin/python`
(.ci/run does both). Without the variable the module is skipped; with DFLASH_REQUIRE_VLLM=1 (CI) that is a failure.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from dflash_hf.core.modeling_dflash import DFlashDraftModel
from dflash_hf.tools.hub import export_drafter
from dflash_hf.training.data import OpenAIClient, chat_prompt_ids, read_jsonl, regenerate
from dflash_hf.training.default_pair import (
    DEFAULT_TARGET_NAME,
    converted_target_dir,
    default_drafter_dir,
    load_default_target,
)
from dflash_hf.training.vllm_server import (
    MAKE_VENV_SCRIPT,
    VLLM_PYTHON_ENV,
    SpecDecodeCounts,
    VLLMServer,
    card_vllm_command,
    server_environment,
    spec_decode_counts,
    vllm_python,
)

REQUIRE_ENV = "DFLASH_REQUIRE_VLLM"
PROMPTS_FILE = Path(__file__).resolve().parents[1] / "dflash_hf" / "assets" / "bench_prompts.jsonl"
NUM_PROMPTS = 6
MAX_TOKENS = 64
START_TIMEOUT_S = 900.0  # both servers start together; a cold start took 75-300 s here under load
REQUEST_TIMEOUT_S = 900.0  # all prompts of one server in flight together
# Added to the card's command for this machine only: float32 (the dtype our loop is exact in), a context this
# test needs, 1 GiB of KV cache (vLLM's CPU backend would otherwise reserve a share of the RAM) and eager mode
# (torch.compile would add minutes of start-up on two cores).
CPU_FLAGS = ["--dtype", "float32", "--max-model-len", "1024", "--enforce-eager"]
CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}


@pytest.fixture(scope="module")
def python() -> Path:
    found = vllm_python()
    if found is None:
        reason = (f"vLLM serving tests need vLLM's own venv: bash {MAKE_VENV_SCRIPT}, then "
                  f"export {VLLM_PYTHON_ENV}=$PWD/.vllm-venv/bin/python")
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{REQUIRE_ENV}=1 but {VLLM_PYTHON_ENV} is unset: {reason}")
        pytest.skip(reason)
    return found


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    return export_drafter(default_drafter_dir(), tmp_path_factory.mktemp("export") / "SmolLM2-135M-Instruct-DFlash",
                          base_model=DEFAULT_TARGET_NAME)


@pytest.fixture(scope="module")
def card_command(exported) -> list[str]:
    """The card's `vllm serve` argv, the Hub ids replaced by the local target folder and the exported drafter."""
    card = (exported / "README.md").read_text(encoding="utf-8")
    return card_vllm_command(card, base_model=DEFAULT_TARGET_NAME, model=str(converted_target_dir()),
                             repo_id=f"<your-org>/{exported.name}", drafter=str(exported))


@pytest.fixture(scope="module")
def servers(python, card_command, tmp_path_factory):
    """``{"dflash": ..., "plain": ...}``: the card's command and the same without --speculative-config, started
    together and stopped by their process groups at the end."""
    logs = tmp_path_factory.mktemp("vllm-logs")
    plain = [w for i, w in enumerate(card_command)
             if w != "--speculative-config" and card_command[i - 1] != "--speculative-config"]
    env = {**server_environment(python, threads=f"0-{(os.cpu_count() or 1) - 1}"), **CPU_ENV}
    started = {name: VLLMServer(python, argv + CPU_FLAGS, logs / f"{name}.log", env=env)
               for name, argv in (("dflash", card_command), ("plain", plain))}
    try:
        for server in started.values():
            server.launch()
        with concurrent.futures.ThreadPoolExecutor(len(started)) as pool:  # each start-up timed on its own
            list(pool.map(lambda server: server.wait_ready(START_TIMEOUT_S), started.values()))
        for name, server in started.items():
            print(f"vLLM {name} server up in {server.startup_s:.0f} s: {shlex.join(server.command())}")
        yield started
    finally:
        for server in started.values():
            server.stop()


@dataclass
class Answers:
    tokens: list[list[int]]
    counts: SpecDecodeCounts | None  # the DFlash server's counters over these requests


def prompt_ids(tokenizer) -> list[list[int]]:
    prompts = [json.loads(line)["prompt"] for line in PROMPTS_FILE.read_text().splitlines()[:NUM_PROMPTS]]
    return [chat_prompt_ids(tokenizer, p) for p in prompts]


def ask(server: VLLMServer, ids: list[list[int]]) -> Answers:
    """Greedy completions of every prompt, all in flight at once; the spec-decode counters they moved."""
    client = OpenAIClient(server.base_url, timeout=REQUEST_TIMEOUT_S, retries=0)
    model = client.served_model()
    before = spec_decode_counts(server.base_url)

    def complete(prompt: list[int]) -> list[int]:
        body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0.0,
                "return_token_ids": True}
        return client.post("/completions", body)["choices"][0]["token_ids"]

    with concurrent.futures.ThreadPoolExecutor(len(ids)) as pool:
        tokens = list(pool.map(complete, ids))
    counts = spec_decode_counts(server.base_url) - before
    return Answers(tokens, counts if counts.drafts else None)


@pytest.fixture(scope="module")
def pair():
    target, tokenizer = load_default_target(torch.float32)
    return target, tokenizer


@pytest.fixture(scope="module")
def ours(pair, exported, card_command) -> tuple[list[list[int]], float]:
    """Our loop on the same prompts, verifying as many drafts per step as the card's vLLM command asks."""
    target, tokenizer = pair
    drafter = DFlashDraftModel.from_pretrained(exported, dtype=torch.float32).eval()
    drafter.num_speculative_tokens = speculative_config(card_command)["num_speculative_tokens"]
    tokens, lengths = [], []
    for ids in prompt_ids(tokenizer):
        row = torch.tensor([ids])
        out = target.generate(row, attention_mask=torch.ones_like(row), assistant_model=drafter,
                              max_new_tokens=MAX_TOKENS, do_sample=False)
        tokens.append(out[0, len(ids):].tolist())
        lengths += drafter.last_stats.acceptance_lengths
    return tokens, sum(lengths) / len(lengths)


@pytest.fixture(scope="module")
def answers(servers, pair) -> dict[str, Answers]:
    ids = prompt_ids(pair[1])
    return {name: ask(server, ids) for name, server in servers.items()}


def speculative_config(argv: list[str]) -> dict:
    return json.loads(argv[argv.index("--speculative-config") + 1])


def test_the_card_command_serves_the_exported_drafter(card_command, exported):
    assert card_command[:3] == ["vllm", "serve", str(converted_target_dir())]
    config = json.loads((exported / "config.json").read_text())
    assert speculative_config(card_command) == {
        "method": "dflash", "model": str(exported), "num_speculative_tokens": config["block_size"] - 1}


def test_dflash_in_vllm_writes_plain_vllm_s_tokens_and_ours(answers, ours):
    dflash, plain = answers["dflash"].tokens, answers["plain"].tokens
    assert [len(t) for t in dflash] == [len(t) for t in plain]
    assert dflash == plain
    assert dflash == ours[0]


def test_vllm_s_acceptance_length_equals_our_loop_s(answers, ours):
    counts = answers["dflash"].counts
    assert counts is not None and answers["plain"].counts is None
    print(f"acceptance length: vLLM {counts.mean_acceptance_length:.3f} ({counts.drafts} drafts, "
          f"{counts.accepted} accepted, per position {list(counts.accepted_per_position)}), ours {ours[1]:.3f}")
    assert abs(counts.mean_acceptance_length - ours[1]) <= 0.05


def test_chat_completions_render_our_chat_template(servers, pair):
    server, tokenizer = servers["plain"], pair[1]
    client = OpenAIClient(server.base_url, timeout=REQUEST_TIMEOUT_S, retries=0)
    messages = [{"role": "user", "content": "Name a colour."}]
    reply = client.post("/chat/completions", {"model": client.served_model(), "messages": messages,
                                              "max_tokens": 4, "temperature": 0.0, "return_token_ids": True})
    assert reply["prompt_token_ids"] == chat_prompt_ids(tokenizer, "Name a colour.")


def test_regeneration_through_the_server_keeps_the_server_s_token_ids(servers, answers, pair, tmp_path):
    tokenizer = pair[1]
    prompts = [json.loads(line)["prompt"] for line in PROMPTS_FILE.read_text().splitlines()[:4]]
    written = regenerate(None, tokenizer, prompts, tmp_path / "data", shard_size=2, max_new_tokens=MAX_TOKENS,
                         openai_base_url=servers["plain"].base_url, openai_concurrency=4)
    records = [r for shard in sorted((tmp_path / "data").glob("shard-*.jsonl")) for r in read_jsonl(shard)]
    assert written == 4 and [r["prompt"] for r in records] == prompts
    for record, ids, tokens in zip(records, prompt_ids(tokenizer), answers["plain"].tokens):
        assert record["input_ids"] == ids + tokens and record["prompt_len"] == len(ids)

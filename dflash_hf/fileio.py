"""Atomic writes whose files and folders get the permissions a plain write would give them, private writes for
files that hold users' prompts, figures saved the same way, and JSON-lines reading whose errors name the file and
the line.

``tempfile.mkstemp`` creates files with mode 0600 and ``mkdtemp`` folders with 0700, and safetensors (0.8 and
later) writes its files 0600 too. Renamed into place as they are, a bench JSON, an exported drafter or the
converted default target could not be read by anyone else, which breaks shared caches and published folders.
Everything written through here ends up ``0666 & ~umask`` (files) and ``0777 & ~umask`` (folders), unless the
writer asks for ``PRIVATE_FILE_MODE`` (recorded prompts: readable by their owner only, whatever the umask).

Standard library only, so that ``dflash-hf --help`` does not pay for torch.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PRIVATE_FILE_MODE = 0o600  # files holding users' prompts (traffic shards, adaptation data)
PRIVATE_DIR_MODE = 0o700


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (``os.umask`` is a set-and-restore that
    another thread could observe)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    return 0o666 & ~current_umask()


def default_dir_mode() -> int:
    return 0o777 & ~current_umask()


def make_shareable(path: str | os.PathLike) -> None:
    """Give ``path`` (a file, or a folder and everything under it) the modes a plain write would have given."""
    path = Path(path)
    file_mode, dir_mode = default_file_mode(), default_dir_mode()
    if not path.is_dir():
        os.chmod(path, file_mode)
        return
    os.chmod(path, dir_mode)
    for root, dirs, files in os.walk(path):
        for name in dirs:
            os.chmod(os.path.join(root, name), dir_mode)
        for name in files:
            full = os.path.join(root, name)
            if not os.path.islink(full):
                os.chmod(full, file_mode)


def others_can_enter(path: str | os.PathLike) -> bool:
    """Whether users other than the owner may list or enter the folder ``path`` (any group or other bit)."""
    return bool(os.stat(path).st_mode & 0o077)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; when the block succeeds it replaces ``path`` in one rename.

    Readers see the old file or the complete new one, never a part. The temporary name keeps ``path``'s suffix,
    for writers that pick a format from it (matplotlib). The file gets ``mode`` (default: what a plain write
    gives); the temporary file is 0600 until then, so a private file is never readable by others on the way.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, default_file_mode() if mode is None else mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str, mode: int | None = None) -> None:
    """Write ``text`` to ``path`` atomically (see ``atomic_file``, and for ``mode``), flushed to disk before the
    rename."""
    with atomic_file(path, mode) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def staging_dir(parent: str | os.PathLike, prefix: str, mode: int | None = None) -> Path:
    """A new, uniquely named folder in ``parent`` to build a folder in before renaming it into place; it gets
    ``mode`` (default: what a plain ``mkdir`` gives)."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(folder, default_dir_mode() if mode is None else mode)
    return folder


def can_plot() -> bool:
    """Whether matplotlib is installed, so that a PNG can be drawn next to a JSON (the bench, the ledgers)."""
    return importlib.util.find_spec("matplotlib") is not None


def save_figure(fig: Any, path: str | os.PathLike) -> None:
    """Write a matplotlib figure as a PNG atomically (a reader never sees half a file) and free the figure."""
    import matplotlib.pyplot as plt

    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)


# ------------------------------------------------------------------------------------------------------------------
# Reading JSON lines
# ------------------------------------------------------------------------------------------------------------------
class InputFileError(ValueError):
    """A file that is not what it should be; the message names the file and the line (``PATH, line N: ...``).

    A ValueError, so that the commands print it as one error line (``cli.input_errors_as``)."""


def line_location(path: str | os.PathLike, number: int) -> str:
    """How a message names line ``number`` of ``path``."""
    return f"{path}, line {number}"


def iter_text_lines(path: str | os.PathLike, hint: str = "") -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of every line of a UTF-8 file, numbered from 1 (a leading byte order mark is
    dropped). A byte that is not UTF-8 raises InputFileError naming the line and column, followed by ``hint``."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                byte = err.object[err.start]  # err.object: the line's bytes, after a byte order mark
                raise InputFileError(
                    f"{line_location(path, number)}: byte 0x{byte:02x} at column {err.start + 1} is not UTF-8 "
                    f"({err.reason}); save the file as UTF-8.{_then(hint)}"
                ) from None
            yield number, text


def iter_json_objects(path: str | os.PathLike, hint: str = "") -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` of every non-blank line of a JSON-lines file. A line that is not valid JSON, or
    not a JSON object, raises InputFileError naming the file, the line and the problem, followed by ``hint``."""
    for number, text in iter_text_lines(path, hint):
        if not text.strip():
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            raise InputFileError(f"{line_location(path, number)}, column {err.colno}: not valid JSON ({err.msg})."
                                 f"{_then(hint)}") from None
        if not isinstance(value, dict):
            raise InputFileError(f"{line_location(path, number)}: expected a JSON object ({{...}}), got "
                                 f"{_kind(value)} ({text.strip()[:60]}).{_then(hint)}")
        yield number, value


def _kind(value: Any) -> str:
    kinds = {str: "a string", list: "a list", bool: "a boolean", type(None): "null", int: "a number",
             float: "a number"}
    return kinds.get(type(value), type(value).__name__)


def _then(hint: str) -> str:
    return f" {hint}" if hint else ""


__all__ = [
    "InputFileError",
    "PRIVATE_DIR_MODE",
    "PRIVATE_FILE_MODE",
    "atomic_file",
    "atomic_write_text",
    "can_plot",
    "current_umask",
    "default_dir_mode",
    "default_file_mode",
    "iter_json_objects",
    "iter_text_lines",
    "line_location",
    "make_shareable",
    "others_can_enter",
    "save_figure",
    "staging_dir",
]

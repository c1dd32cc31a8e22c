"""Atomic writes whose files and folders get the permissions a plain write would give them.

``tempfile.mkstemp`` creates files with mode 0600 and ``mkdtemp`` folders with 0700, and safetensors (0.8 and
later) writes its files 0600 too. Renamed into place as they are, a bench JSON, an exported drafter or the
converted default target could not be read by anyone else, which breaks shared caches and published folders.
Everything written through here ends up ``0666 & ~umask`` (files) and ``0777 & ~umask`` (folders).

Standard library only, so that ``dflash-hf --help`` does not pay for torch.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


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


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; when the block succeeds it replaces ``path`` in one rename.

    Readers see the old file or the complete new one, never a part. The temporary name keeps ``path``'s suffix,
    for writers that pick a format from it (matplotlib).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see ``atomic_file``), flushed to disk before the rename."""
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def staging_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """A new, uniquely named folder in ``parent`` to build a folder in before renaming it into place."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(folder, default_dir_mode())
    return folder


__all__ = [
    "atomic_file",
    "atomic_write_text",
    "current_umask",
    "default_dir_mode",
    "default_file_mode",
    "make_shareable",
    "staging_dir",
]

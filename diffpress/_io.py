"""Atomic output: write into a temporary sibling, then rename into place; nothing is overwritten unasked."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from diffpress.errors import DiffpressError


def check_writable(path: str | os.PathLike, force: bool) -> Path:
    """Raise if ``path`` exists and ``force`` is false; return it as a Path."""
    path = Path(path)
    if path.exists() and not force:
        raise DiffpressError(f"{path} already exists; pass --force (force=True) to overwrite it")
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``path`` only if the block finishes without error.

    On an error or Ctrl-C the temporary directory is removed and an existing ``path`` is untouched.

    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "result"
    >>> with atomic_dir(out) as tmp:
    ...     _ = (tmp / "a.txt").write_text("hi")
    >>> (out / "a.txt").read_text()
    'hi'
    """
    path = check_writable(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the result should look like any new folder
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.rename(old)
            try:
                tmp.rename(path)
            except BaseException:
                old.rename(path)  # put the previous result back
                raise
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary file path that replaces ``path`` only if the block finishes without error."""
    path = check_writable(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

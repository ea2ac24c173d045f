"""Atomic output (write into a temporary sibling, then rename into place; nothing is overwritten unasked) and
packed storage of low-bit integers."""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from diffpress.errors import DiffpressError

if TYPE_CHECKING:
    import torch


def check_writable(path: str | os.PathLike, force: bool) -> Path:
    """Raise if ``path`` exists and ``force`` is false, or if nothing can be written where it would go (its
    nearest existing folder refuses a new file); return it as a Path. Nothing is left behind."""
    path = Path(path)
    if path.exists() and not force:
        raise DiffpressError(f"{path} already exists; pass --force (force=True) to overwrite it")
    folder = path.absolute().parent
    while not folder.exists():
        folder = folder.parent
    try:
        if not folder.is_dir():
            raise NotADirectoryError(f"{folder} is not a folder")
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise DiffpressError(f"cannot write {path}: {folder} does not take new files ({exc.strerror or exc}); "
                             "choose another output path") from None
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


def pack_int(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed ``bits``-bit integers (held in int8) packed into bytes, two 4-bit values per byte (low nibble
    first), flattened; :func:`unpack_int` inverts it given the shape.

    >>> import torch
    >>> v = torch.tensor([[-8, 7, 3], [0, -1, 5]], dtype=torch.int8)
    >>> p = pack_int(v, 4); p.dtype, p.numel()
    (torch.uint8, 3)
    >>> torch.equal(unpack_int(p, 4, v.shape), v)
    True
    """
    import torch

    if bits != 4:
        raise DiffpressError(f"packing {bits}-bit values is not supported (4-bit only)")
    flat = values.reshape(-1).to(torch.int16)
    if flat.numel() and (flat.min() < -8 or flat.max() > 7):
        raise DiffpressError("values outside [-8, 7] cannot be packed as int4")
    nib = (flat & 0x0F).to(torch.uint8)
    if nib.numel() % 2:
        nib = torch.cat([nib, nib.new_zeros(1)])
    return nib[0::2] | (nib[1::2] << 4)


def unpack_int(packed: torch.Tensor, bits: int, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Inverse of :func:`pack_int`: int8 values of ``shape``."""
    import torch

    if bits != 4:
        raise DiffpressError(f"unpacking {bits}-bit values is not supported (4-bit only)")
    n = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.numel() != (n + 1) // 2:
        raise DiffpressError(f"packed int4 data of {packed.numel()} bytes ({packed.dtype}) does not hold {n} values")
    p = packed.reshape(-1).to(torch.int16)
    nib = torch.stack([p & 0x0F, p >> 4], 1).reshape(-1)[:n]
    return torch.where(nib >= 8, nib - 16, nib).to(torch.int8).reshape(shape)

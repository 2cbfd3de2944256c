"""Atomic file writes, one-writer locks, hashing and safe checkpoint I/O.

Every artefact is first written next to its destination and then moved into place with
``os.replace``, so an interrupted run never leaves a half-written file or directory behind.
An output being written is held by an exclusive lock (``.<name>.lock`` beside it): a second
process that wants to write it refuses at once, naming the holder. The lock is a ``flock``, so
the kernel releases it when its process dies, however it dies.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file

from feddmmr.errors import FeddmmrError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _step(name: str) -> None:
    """A point of an atomic swap (``written``, ``exchanged``, ``moved aside``, ``moved in``): the fault-injection
    tests end the process abruptly here to prove that every point leaves a whole old or new output."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def settle(dest: str | os.PathLike) -> None:
    """Recover or clean what a killed writer of ``dest`` left beside it (its pid is in the names): a whole old
    output moved aside (``.<name>.<pid>.old``) is moved back when ``dest`` is missing, else removed; a half-written
    ``.<name>.<pid>.*.tmp`` is removed. A leftover of a living process is left alone."""
    dest = Path(dest)
    if not dest.parent.is_dir():
        return
    name = re.escape(dest.name)      # .<name>.<pid>.old | .<name>.<pid>.<8 random>.tmp | .<name>.old-<pid> (older feddmmr)
    pattern = re.compile(rf"\.{name}\.(\d+)\.(old|[a-z0-9_]{{8}}\.tmp)|\.{name}\.(old)-(\d+)")
    for left in sorted(dest.parent.iterdir(), key=lambda f: not re.search(r"\.old(-\d+)?$", f.name)):  # old first
        match = pattern.fullmatch(left.name)
        if match is None:
            continue
        pid, kind = (match.group(1), match.group(2)) if match.group(1) else (match.group(4), match.group(3))
        if _alive(int(pid)):
            continue
        if kind == "old" and not dest.exists():
            os.replace(left, dest)
        elif left.is_dir() and not left.is_symlink():
            shutil.rmtree(left, ignore_errors=True)
        else:
            left.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; move it onto ``dest`` only if the block succeeds."""
    dest = Path(dest)
    if dest.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a folder, not a file", str(dest))
    dest.parent.mkdir(parents=True, exist_ok=True)
    settle(dest)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.{os.getpid()}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp_path, dest)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _fsync_tree(folder: Path) -> None:
    """Flush the files of ``folder`` and the folder itself to disk (survives a power loss)."""
    for f in folder.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_RENAME_EXCHANGE, _AT_FDCWD = 2, -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where the C library or
    the file system lacks it."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike, durable: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory; it replaces ``dest`` as a whole only on success.

    The swap is one atomic exchange of the two folders where the platform has it (Linux), so that a kill at any
    point leaves the whole old or the whole new ``dest``; elsewhere the old folder is moved aside first and a kill
    between the two renames is recovered by ``settle`` at the next write or read. ``durable``: fsync the files
    before the swap and the parent after it.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    settle(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.{os.getpid()}.", suffix=".tmp", dir=dest.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if durable:
            _fsync_tree(tmp)
        _step("written")
        if dest.exists() and _exchange(tmp, dest):     # tmp now holds the old output, removed below
            _step("exchanged")
        elif dest.exists():
            old = dest.with_name(f".{dest.name}.{os.getpid()}.old")
            os.replace(dest, old)
            _step("moved aside")
            os.replace(tmp, dest)
            _step("moved in")
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
            _step("moved in")
        if durable:
            _fsync_tree(dest.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise FeddmmrError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise FeddmmrError(f"{path} is not valid JSON ({exc}); re-create it by re-running the step that writes it") from None


def nonfinite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors that hold a NaN or an infinity."""
    return [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Save tensors with safetensors (no pickle), atomically; a non-finite tensor is never written."""
    bad = nonfinite(tensors)
    if bad:
        raise FeddmmrError(f"refusing to write {path}: {len(bad)} tensors hold NaN/inf values ({', '.join(bad[:3])}); "
                           f"the run diverged")
    with atomic_path(path) as tmp:
        try:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        except Exception as exc:   # safetensors reports a failed write as SafetensorError: "... (os error 28)"
            code = re.search(r"os error (\d+)", str(exc))
            if code is None:
                raise
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None
        if metadata:
            _sort_metadata(tmp)


def _sort_metadata(path: Path) -> None:
    """safetensors writes ``__metadata__`` in hash order, different from run to run: rewrite it sorted, so that
    the same tensors and metadata give the same bytes (and DVC the same output hash)."""
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > size:   # the same keys and values, compact: never longer than what safetensors wrote
            raise AssertionError(f"{path}: re-serialised safetensors header outgrew its {size} bytes")
        f.seek(8)
        f.write(text.ljust(size))


def load_tensors(path: str | os.PathLike, what: str, fix: str) -> dict[str, torch.Tensor]:
    """Load a safetensors file, failing with a message naming the file and the fix."""
    path = Path(path)
    if not path.is_file():
        raise FeddmmrError(f"{what} not found: {path} ({fix})")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises several error types on corrupt files
        raise FeddmmrError(f"{what} at {path} could not be read ({exc}); {fix}") from None


def safetensors_header(path: str | os.PathLike, what: str, fix: str) -> tuple[dict[str, tuple[str, list[int]]], dict]:
    """({tensor: (dtype, shape)}, metadata) from a safetensors file's header, without reading any tensor:
    what a loader checks before it allocates anything."""
    path = Path(path)
    if not path.is_file():
        raise FeddmmrError(f"{what} not found: {path} ({fix})")
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size <= min(100 << 20, path.stat().st_size - 8):
                raise ValueError(f"header size {size} does not fit the file")
            header = json.loads(f.read(size))
        meta = header.pop("__metadata__", None) or {}
        tensors = {k: (str(v["dtype"]), [int(d) for d in v["shape"]]) for k, v in header.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise FeddmmrError(f"{what} at {path} is not a safetensors file ({exc}); {fix}") from None
    return tensors, meta


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def os_error_line(exc: OSError) -> tuple[str, int]:
    """A failed read or write as one line with its fix, and the exit status: 5 when the machine failed (disk full,
    I/O error: running again may pass), 2 when the path is the problem (permissions, a path below a file)."""
    where = f" {exc.filename}" if exc.filename else ""
    what = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"cannot write{where}: {what}; free some space or write elsewhere (--out), then run the command "
                f"again (a training stage resumes after its last finished round; nothing half-written was kept)", 5)
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write{where}: {what}; choose a folder you can write (--out) or fix its permissions", 2
    if exc.errno in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
        return (f"cannot use{where} as an output: {what} (a part of the path is a file, or the path is a folder); "
                f"choose another path (--out)", 2)
    return f"input/output error{where}: {what}; check the disk and run the command again", 5


def lock_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.parent / f".{path.name}.lock"


@contextlib.contextmanager
def exclusive(path: str | os.PathLike) -> Iterator[None]:
    """Hold the one-writer lock of ``path`` for the block; refuse at once if another process holds it."""
    lock = lock_path(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise FeddmmrError(f"{path} is being written by {holder}; wait for it to finish, stop it, or write "
                           f"somewhere else (--out / --metrics)") from None
    try:
        os.ftruncate(fd, 0)
        command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300]
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')} "
                      f"({command})".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock; the (empty-of-meaning) file stays, removing it would race

"""File-system safety: atomic directory writes that replace only what we wrote, output-directory
checks, safetensors verification and package versions."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import importlib.metadata
import json
import os
import shutil
import socket
import struct
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from vlm_adapters.errors import OutputError

MANIFEST = ".vlm_adapters_files.json"
"""Written into every directory we create: the entries we wrote (so we replace only those)."""
_TMP, _OLD = "tmp", "old"


def default_mode(directory: bool = True) -> int:
    """Permissions a plain ``mkdir``/``open`` would give under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def written_by_us(path: Path) -> list[str] | None:
    """The entries a directory's manifest says we wrote, or None when it is not ours."""
    try:
        names = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(names, list) or not all(_plain_name(n) for n in names):
        return None
    return names


def claim_entries(path: Path, entries: Iterable[str]) -> None:
    """Record ``entries`` of ``path`` as written by us (added to its manifest)."""
    ours = sorted({*(written_by_us(path) or ()), *entries})
    atomic_write_text(path / MANIFEST, json.dumps(ours))


def _plain_name(name: object) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name


def is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def check_output_dir(
    path: str | Path, *, overwrite: bool = False, protect: Iterable[str | Path] = ()
) -> Path:
    """Refuse an output directory that would destroy something: one of ``protect`` (the source
    of an export, say), a folder inside or around it, a file, or a non-empty directory we did
    not write (unless ``overwrite``). Returns the resolved path."""
    path = Path(path).expanduser().resolve()
    for source in protect:
        src = Path(source).expanduser().resolve()
        if path == src or src in path.parents or path in src.parents:
            raise OutputError(
                f"output {path} overlaps the source {src}; write to a separate directory"
            )
    if path.exists() and not path.is_dir():
        raise OutputError(f"output {path} is a file; choose a directory")
    if path.is_dir() and not is_empty_dir(path) and written_by_us(path) is None and not overwrite:
        raise OutputError(
            f"output {path} exists, is not empty and was not written by vlm-adapters; choose "
            "another directory, or pass --overwrite (Python: overwrite=True) to add our files "
            "to it (yours are kept)"
        )
    return path


@contextlib.contextmanager
def atomic_dir(
    path: str | Path, *, overwrite: bool = False, protect: Iterable[str | Path] = ()
) -> Iterator[Path]:
    """Yield an empty temporary directory whose entries replace, atomically, what we wrote at
    ``path`` before; nothing else there is touched.

    A crash inside the block leaves ``path`` as it was. An earlier output of ours (it has a
    manifest) loses its old entries; a user's other files in it are kept. A non-empty directory
    we did not write is refused unless ``overwrite`` (see :func:`check_output_dir`).
    """
    path = check_output_dir(path, overwrite=overwrite, protect=protect)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent, path.name)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path.name, _TMP), dir=path.parent))
    try:
        os.chmod(tmp, default_mode())
        yield tmp
        ours = sorted(p.name for p in tmp.iterdir())
        (tmp / MANIFEST).write_text(json.dumps(ours))
        _settle_tree(tmp)
        if path.exists() and not is_empty_dir(path):
            _keep_foreign_entries(path, tmp, ours)
            _swap_in(tmp, path)
        else:
            os.replace(tmp, path)  # onto nothing, or onto an empty directory
        _fsync_dir(path.parent)
    finally:
        remove_tree(tmp)


def _temp_prefix(name: str, kind: str) -> str:
    return f".{name}.{kind}-{socket.gethostname()}-{os.getpid()}-"


def temp_name(name: str, kind: str = _OLD) -> str:
    """A fresh temporary sibling name for ``name`` that :func:`remove_stale_temps` recognises."""
    return _temp_prefix(name, kind) + os.urandom(4).hex()


def remove_stale_temps(parent: Path, name: str | None = None) -> list[Path]:
    """Remove our temporary siblings (``.NAME.tmp-*`` / ``.NAME.old-*``) left by dead processes."""
    removed = []
    if not parent.is_dir():
        return removed
    for entry in parent.iterdir():
        owner = _temp_owner(entry.name, name)
        if owner is not None and not process_alive(*owner):
            remove_tree(entry)
            removed.append(entry)
    return removed


def _temp_owner(entry: str, name: str | None) -> tuple[str, int] | None:
    """``(host, pid)`` encoded in one of our temporary names, else None."""
    if not entry.startswith("."):
        return None
    for kind in (_TMP, _OLD):
        stem, sep, rest = entry[1:].rpartition(f".{kind}-")
        if not sep or (name is not None and stem != name):
            continue
        parts = rest.rsplit("-", 2)
        if len(parts) == 3 and parts[1].isdigit():
            return parts[0], int(parts[1])
    return None


def process_alive(host: str, pid: int) -> bool:
    """Whether ``pid`` runs on this host (a process on another host counts as alive)."""
    if host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _keep_foreign_entries(path: Path, tmp: Path, ours: list[str]) -> None:
    """Hard-link (or copy) into ``tmp`` every entry of ``path`` we did not write earlier."""
    earlier = set(written_by_us(path) or ()) | {MANIFEST}
    for entry in path.iterdir():
        if entry.name in earlier or entry.name in ours:
            continue
        _link_tree(entry, tmp / entry.name)


def _link_tree(src: Path, dst: Path) -> None:
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        dst.mkdir()
        shutil.copystat(src, dst)
        for child in src.iterdir():
            _link_tree(child, dst / child.name)
    else:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)


def _swap_in(new: Path, path: Path) -> None:
    """Put ``new`` at ``path``; the previous ``path`` ends up at ``new`` (then removed)."""
    if _exchange(new, path):
        return
    old = Path(tempfile.mkdtemp(prefix=_temp_prefix(path.name, _OLD), dir=path.parent))
    os.rmdir(old)
    os.replace(path, old)
    os.replace(new, path)
    os.replace(old, new)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``)."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return result == 0


def remove_tree(path: Path) -> None:
    """Remove a file, a link or a directory tree (missing is fine)."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


def _settle_tree(root: Path) -> None:
    """Give every file and folder the permissions a plain write would, and flush it to disk
    (some writers create private 0600 temp files and rename them)."""
    files, folders = default_mode(directory=False), default_mode()
    for entry in root.rglob("*"):
        if entry.is_symlink():
            continue
        if entry.is_dir():
            os.chmod(entry, folders)
            continue
        os.chmod(entry, files | (entry.stat().st_mode & 0o111 & folders))
        with open(entry, "rb") as handle:
            os.fsync(handle.fileno())


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small file through a temporary sibling and a rename."""
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file through a temporary sibling and a rename."""
    tmp = path.with_name(temp_name(path.name, _TMP))
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete safetensors file (missing, truncated, bad header), or None."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                return f"{path} is truncated ({size} bytes)"
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > size - 8:
                return f"{path} is truncated (header of {header_len} bytes in {size})"
            header = json.loads(handle.read(header_len))
    except FileNotFoundError:
        return f"{path} is missing"
    except (OSError, ValueError) as error:
        return f"{path} has an unreadable header ({error})"
    try:
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (AttributeError, KeyError, TypeError, IndexError, ValueError):
        return f"{path} has an unreadable header"
    expected = 8 + header_len + max(ends, default=0)
    if size != expected:
        return f"{path} has {size} bytes but its header describes {expected}; it is truncated"
    return None


def package_versions(*names: str) -> dict[str, str]:
    """Installed versions of ``names`` (``"not installed"`` when absent)."""
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out

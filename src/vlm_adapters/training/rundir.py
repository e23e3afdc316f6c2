"""The run directory: one run at a time (a lock file), never a directory we did not write, and
no resume with a silently changed config."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import yaml

from vlm_adapters._io import (
    check_output_dir,
    claim_entries,
    process_alive,
    temp_name,
    written_by_us,
)
from vlm_adapters.config import SECTIONS
from vlm_adapters.errors import ConfigError, OutputError, VLMError
from vlm_adapters.training.config import train_config_from_dict

logger = logging.getLogger("vlm_adapters.training")
LOCK_NAME = "run.lock"
CONFIG_NAME = "config.yaml"
RUN_ENTRIES = (CONFIG_NAME, LOCK_NAME, "align", "finetune", "preference")
"""What a training run writes at the top of its directory."""
RUNTIME_KEYS = frozenset(
    {
        "run.compile",
        "run.save_every",
        "run.keep_last",
        "run.log_every",
        "run.trackers",
        "data.num_workers",
        "stages.align.feature_cache",
        "stages.finetune.feature_cache",
        "llm.attn_implementation",  # the same weights through another attention kernel
    }
)
"""Settings a resumed run may change: they do not change what is trained."""
T = TypeVar("T")


def on_main(state: Any, work: Callable[[], T]) -> T | None:
    """Run ``work`` on the main process; an error it raises is raised on every process."""
    from accelerate.utils import broadcast_object_list

    result: list[Any] = [None, None]
    if state.is_main_process:
        try:
            result = [work(), None]
        except VLMError as error:
            result = [None, (type(error), str(error))]
    if state.num_processes > 1:
        broadcast_object_list(result)
    if result[1] is not None:
        kind, message = result[1]
        try:
            error = kind(message)
        except TypeError:
            error = VLMError(message)
        raise error
    return result[0]


@contextlib.contextmanager
def locked_run_dir(out: Path, *, overwrite: bool, state: Any) -> Iterator[Path]:
    """Claim ``out`` for this run: refuse a directory that is not ours (unless ``overwrite``)
    or is used by a live run; take over the lock of a dead one with a warning."""
    on_main(state, lambda: _claim(out, overwrite))
    try:
        yield out
    finally:
        if state.is_main_process:
            release_lock(out)


def _claim(out: Path, overwrite: bool) -> None:
    check_output_dir(out, overwrite=overwrite)
    _refuse_foreign_entries(out)
    out.mkdir(parents=True, exist_ok=True)
    acquire_lock(out)
    claim_entries(out, RUN_ENTRIES)


def _refuse_foreign_entries(out: Path) -> None:
    """An OutputError when ``out`` holds something we did not write that the run would have to
    replace: a ``config.yaml`` of any kind, or a stage entry that is not a folder (a stage
    folder of the user's, e.g. a link to an earlier run's ``align``, is read and added to)."""
    ours = set(written_by_us(out) or ()) if out.is_dir() else set()
    for name in RUN_ENTRIES:
        path = out / name
        if name in ours or name == LOCK_NAME or not (path.exists() or path.is_symlink()):
            continue
        if name == CONFIG_NAME or not path.is_dir():
            raise OutputError(
                f"{path} exists and was not written by vlm-adapters; --overwrite adds the run's "
                "files beside yours but never replaces one: move it, or choose another --out"
            )


def acquire_lock(out: Path) -> None:
    """Create ``out/run.lock`` with this process's id, host and start time.

    The lock is written to a temporary file and hard-linked into place, so it appears at once
    with its content (``link`` fails when the lock exists).
    """
    path = out / LOCK_NAME
    tmp = out / temp_name(LOCK_NAME, "tmp")
    tmp.write_text(json.dumps(_lock_info()))
    try:
        for _ in range(3):
            try:
                os.link(tmp, path)
                return
            except FileExistsError:
                _take_over_if_stale(path)
    finally:
        tmp.unlink(missing_ok=True)
    raise OutputError(f"{path}: could not take the run lock; another run keeps taking it")


def _lock_info() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(sys.argv),
    }


def _take_over_if_stale(path: Path) -> None:
    """Remove the lock of a dead process (with a warning); refuse a live one's, and one we
    cannot read (its run may be alive)."""
    lock = _read_lock(path)
    if lock is None:
        return  # released meanwhile: try again
    host, pid, info = lock
    if process_alive(host, pid):
        raise OutputError(
            f"{path.parent} is in use by another run (pid {pid} on {host}, started "
            f"{info.get('started', '?')}: {info.get('command', '?')}); use another --out, or "
            f"wait for it; if no such run exists, delete {path}"
        )
    logger.warning("%s: taking over the lock of a run that is gone (%s)", path.parent, info)
    stale = path.with_name(f".{LOCK_NAME}.stale-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        os.replace(path, stale)
        stale.unlink()


def _read_lock(path: Path) -> tuple[str, int, dict[str, Any]] | None:
    """The host, pid and content of a lock, or None when it is gone; an OutputError when it
    is not a lock file a run wrote (a folder, a link, unreadable or unparsable content)."""
    if path.is_symlink() or path.exists() and not path.is_file():
        what = "a folder" if path.is_dir() else "not a plain file"
        raise OutputError(f"{path} is {what}, so not a run lock; move it away or use another --out")
    try:
        info = json.loads(path.read_text())
        return str(info["host"]), int(info["pid"]), info
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise OutputError(
            f"{path}: cannot read this run lock ({type(error).__name__}: {error}), so a run may "
            f"still hold it; if no run uses {path.parent}, delete {path} and run again"
        ) from None


def release_lock(out: Path) -> None:
    """Remove ``out/run.lock`` if this process holds it."""
    path = out / LOCK_NAME
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        if json.loads(path.read_text())["pid"] == os.getpid():
            path.unlink()


def check_resume_config(out: Path, config: dict[str, Any], allow_change: bool) -> None:
    """Refuse to resume with a config that differs (outside :data:`RUNTIME_KEYS`) from the
    one the run started with, unless ``allow_change``; the message lists every difference.
    A changed model section (vision, connector, llm) is refused even with ``allow_change``:
    the checkpoints hold weights of the model the run started with."""
    saved_path = out / CONFIG_NAME
    if not saved_path.is_file():
        return
    try:
        saved = yaml.safe_load(saved_path.read_text()) or {}
    except yaml.YAMLError:
        raise ConfigError(f"{saved_path}: unreadable; the run directory is damaged") from None
    differences = config_differences(_with_defaults(saved), _with_defaults(config))
    changes = [c for c in differences if c[0] not in RUNTIME_KEYS]
    _refuse_model_change(saved_path, [c for c in changes if c[0].split(".")[0] in SECTIONS])
    if not changes:
        return
    if allow_change:
        logger.warning("resuming with a changed config: %s", _listed(changes))
        return
    raise ConfigError(
        f"the config differs from the one {out} was started with ({_listed(changes)}); resume "
        "with the same config, or pass --allow-config-change"
    )


def _with_defaults(saved: dict[str, Any]) -> dict[str, Any]:
    """A config with today's defaults for the keys it leaves out (a key added since a run
    started is not a change); as it is when it does not validate."""
    try:
        return train_config_from_dict(saved).to_dict()
    except VLMError:
        return saved


def _refuse_model_change(saved_path: Path, changes: list[tuple[str, Any, Any]]) -> None:
    """A ConfigError listing ``changes`` to the model sections, if any."""
    if changes:
        raise ConfigError(
            f"the model differs from the one {saved_path.parent} was started with "
            f"({_listed(changes)}); --allow-config-change covers training settings (data, "
            "stages, run), not the model's shape (vision, connector, llm: the weights in the "
            f"checkpoints); resume with the model sections of {saved_path}, or train into "
            "another --out"
        )


def _listed(changes: list[tuple[str, Any, Any]]) -> str:
    return "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in changes)


def config_differences(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted key, old, new)`` for every leaf where two nested mappings differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        changes = []
        for key in sorted(set(old) | set(new), key=str):
            here = f"{prefix}.{key}" if prefix else str(key)
            changes += config_differences(old.get(key), new.get(key), here)
        return changes
    return [] if old == new else [(prefix, old, new)]

"""Bad inputs of the feature cache through the real CLI: a ``stages.<stage>.feature_cache`` that
cannot hold a cache, and ``cache-features`` options this machine cannot honour, each end in one
line naming the key or option and the fix, before any model is built.

Cases that depend on the machine (no accelerator, a folder we may not write) patch what the
check asks: the tests run as root, which may write anywhere, so ``os.access`` is made to answer
as it does for a user without permission (or on a read-only mount).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from bad_input_kit import Call, Case, Env, _set  # noqa: E402

CACHE = "stages.align.feature_cache"


def _notes(env: Env) -> Path:
    """A file of the user's where a cache folder should be."""
    path = env.tmp / "notes.txt"
    path.write_text("my notes\n")
    return path


def _train_with_cache(folder: Callable[[Env], Path]) -> Callable[[Env], Call]:
    """``train`` with ``stages.align.feature_cache`` set to ``folder``: refused before the run
    folder is made."""

    def setup(env: Env) -> Call:
        call = env.train(edit=_set(CACHE, str(folder(env))))
        call.absent = (env.out,)
        return call

    return setup


def _cache_features(
    *extra: str, before: tuple[str, ...] = (), folder: Callable[[Env], Path] | None = None
) -> Callable[[Env], Call]:
    """``cache-features *before CONFIG *extra`` with ``stages.align.feature_cache`` set to
    ``folder`` (default: a fresh ``cache`` folder, which must stay absent)."""

    def setup(env: Env) -> Call:
        cache = env.tmp / "cache" if folder is None else folder(env)
        config = env.config(_set(CACHE, str(cache)))
        absent = (cache,) if folder is None else ()
        return Call(["cache-features", *before, str(config), *extra], absent=absent)

    return setup


CASES = [
    Case(
        "cache-folder-is-a-file-train",
        _train_with_cache(_notes),
        (CACHE, "notes.txt is a file, not a folder", "set it to a folder", "tiny.yaml"),
    ),
    Case(
        "cache-folder-is-a-file-cache-features",
        _cache_features(folder=_notes),
        (CACHE, "notes.txt is a file, not a folder", "tiny.yaml"),
    ),
    Case(
        "cache-folder-inside-a-file",
        _train_with_cache(lambda env: _notes(env) / "cache"),
        (CACHE, "notes.txt is a file", "notes.txt/cache cannot be created", "set it to a folder"),
    ),
    Case("cache-features-batch-size-zero", _cache_features("--batch-size", "0"), ("--batch-size",)),
    Case(
        "cache-features-batch-size-negative-before-config",
        _cache_features(before=("--batch-size", "-3")),
        ("--batch-size", "-3", "use 1 or more"),
    ),
    Case(
        "cache-features-device-unknown",
        _cache_features("--device", "tpu9"),
        ("--device tpu9", "not a device name", "cpu"),
    ),
]


def _unwritable(monkeypatch: pytest.MonkeyPatch, tmp: Path) -> None:
    """``tmp/cache`` exists, and ``os.access`` says it may not be written."""
    folder = tmp / "cache"
    folder.mkdir()
    access = os.access
    denied = lambda path, mode, **kw: Path(path) != folder and access(path, mode, **kw)  # noqa: E731
    monkeypatch.setattr(os, "access", denied)


def _no_accelerator(monkeypatch: pytest.MonkeyPatch, tmp: Path) -> None:
    """No GPU (or other accelerator) on this machine, whatever it has."""
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _cache_dir(env: Env) -> Path:
    return env.tmp / "cache"


PATCHED_CASES = [
    (
        Case(
            "cache-folder-not-writable-train",
            _train_with_cache(_cache_dir),
            (CACHE, "cache is not writable", "choose a folder you can write to", "tiny.yaml"),
        ),
        _unwritable,
    ),
    (
        Case(
            "cache-folder-not-writable-cache-features",
            _cache_features(folder=_cache_dir),
            (CACHE, "cache is not writable", "tiny.yaml"),
        ),
        _unwritable,
    ),
    (
        Case(
            "cache-features-device-cuda-without-gpu",
            _cache_features("--device", "cuda"),
            ("--device cuda", "not on this machine", "use one of this machine's: cpu"),
        ),
        _no_accelerator,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input(case: Case, run_case: Callable[[Case], None]) -> None:
    run_case(case)


@pytest.mark.parametrize(
    ("case", "patch"), PATCHED_CASES, ids=[case.id for case, _ in PATCHED_CASES]
)
def test_bad_input_on_this_machine(
    case: Case,
    patch: Callable[[pytest.MonkeyPatch, Path], None],
    run_case: Callable[[Case], None],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    patch(monkeypatch, tmp_path)  # the same tmp_path and monkeypatch run_case uses
    run_case(case)

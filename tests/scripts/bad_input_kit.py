"""The harness of the bad-input tests: a case prepares its files under its own ``tmp_path``
(copies of a shared tiny config, run and checkpoint), runs the real CLI in-process, and must end
in one line naming the culprit, with no traceback and nothing outside the run's ``--out`` changed.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import struct
import sys
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image

from vlm_adapters import build_vlm
from vlm_adapters.cli import main
from vlm_adapters.testing.tiny import tiny_model_config

sys.path.insert(0, str(Path(__file__).parent))
from tiny_train import write_tiny_config  # noqa: E402

Edit = Callable[[dict[str, Any]], Any]


@dataclass(frozen=True)
class Shared:
    """Built once per module: a tiny config root, an align run (with a step-1 checkpoint) trained
    from it, and a saved tiny checkpoint."""

    tiny: Path
    run: Path
    ckpt: Path


def make_shared(tmp_path_factory: pytest.TempPathFactory) -> Shared:
    """The tiny config root, align run and checkpoint a module's cases copy from."""
    base = tmp_path_factory.mktemp("shared")
    config = write_tiny_config(base / "tiny", num_train=8, run={"save_every": 1})
    assert main(["train", str(config), "--out", str(base / "run"), "--stage", "align"]) == 0
    build_vlm(tiny_model_config(str(base / "tiny" / "tokenizer"))).save_pretrained(base / "ckpt")
    return Shared(base / "tiny", base / "run", base / "ckpt")


@dataclass(frozen=True)
class SkipLog:
    """A ``skipped.jsonl`` that lists exactly the samples ``indices`` of ``data``, each with its
    id, file, index and a reason containing ``reason``."""

    path: Path
    data: str
    reason: str
    indices: tuple[int, ...]


@dataclass
class Call:
    """What a case runs, and what must hold afterwards besides the common checks."""

    argv: list[str]
    scratch: Path | None = None
    """The run's fresh ``--out``, which the command may write; None: nothing may change."""
    absent: tuple[Path, ...] = ()
    """Paths that must not exist afterwards."""
    skipped: SkipLog | None = None
    """The ``skipped.jsonl`` the run must leave."""


@dataclass
class Env:
    """One case's directory, with helpers that copy the shared things into it."""

    tmp: Path
    shared: Shared

    @property
    def root(self) -> Path:
        """The case's copy of the tiny config root (shapes data, tokenizer, tiny.yaml)."""
        root = self.tmp / "tiny"
        if not root.exists():
            shutil.copytree(self.shared.tiny, root)
            self._repoint(root / "tiny.yaml")
        return root

    @property
    def images(self) -> Path:
        return self.root / "shapes" / "images"

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    def _repoint(self, path: Path) -> None:
        path.write_text(path.read_text().replace(str(self.shared.tiny), str(self.tmp / "tiny")))

    def config(self, edit: Edit | None = None) -> Path:
        """The case's tiny.yaml, changed in place by ``edit``."""
        path = self.root / "tiny.yaml"
        data = yaml.safe_load(path.read_text())
        if edit is not None:
            edit(data)
        path.write_text(yaml.safe_dump(data))
        return path

    def train(self, *extra: str, stage: str = "align", edit: Edit | None = None) -> Call:
        """``train CONFIG --out OUT --stage STAGE *extra`` into a fresh ``out``."""
        argv = ["train", str(self.config(edit)), "--out", str(self.out), "--stage", stage]
        return Call([*argv, *extra], scratch=self.out)

    def run(self) -> Path:
        """The case's copy of the shared align run (same config paths as :meth:`config`)."""
        self.root  # noqa: B018  (copy the config root first)
        run = self.tmp / "run"
        shutil.copytree(self.shared.run, run, symlinks=True)
        self._repoint(run / "config.yaml")
        return run

    def records(self, name: str = "align.json") -> list[dict[str, Any]]:
        return json.loads((self.root / "shapes" / name).read_text())

    def write_data(self, content: Any, name: str = "align.json") -> Path:
        """Replace a data file of the copy: a string as is, anything else as JSON."""
        path = self.root / "shapes" / name
        path.write_text(content if isinstance(content, str) else json.dumps(content))
        return path

    def ckpt(self, edit: Edit | None = None) -> Path:
        """The case's copy of the tiny checkpoint (``edit`` changes its config.json)."""
        path = self.tmp / "ckpt"
        shutil.copytree(self.shared.ckpt, path)
        if edit is not None:
            config = json.loads((path / "config.json").read_text())
            edit(config)
            (path / "config.json").write_text(json.dumps(config))
        return path

    def user_dir(self, name: str = "mine") -> Path:
        """A non-empty directory of the user's (not written by vlm-adapters)."""
        path = self.tmp / name
        path.mkdir()
        (path / "notes.txt").write_text("my notes\n")
        return path


@dataclass(frozen=True)
class Case:
    """One bad input: its pytest id, what it sets up, and what the error must name."""

    id: str
    setup: Callable[[Env], Call]
    expect: tuple[str, ...]
    """Substrings stderr must contain (the culprit: file, sample, key or flag)."""


def _set(key: str, value: Any) -> Edit:
    """An edit setting dotted ``key`` of the config dict to ``value``."""

    def edit(data: dict[str, Any]) -> None:
        *parents, last = key.split(".")
        for part in parents:
            data = data.setdefault(part, {})
        data[last] = value

    return edit


def _drop(key: str) -> Edit:
    """An edit removing dotted ``key``."""

    def edit(data: dict[str, Any]) -> None:
        *parents, last = key.split(".")
        for part in parents:
            data = data[part]
        del data[last]

    return edit


# --- files -----------------------------------------------------------------------------------


def _write_bomb(path: Path, side: int = 20_000) -> None:
    """A tiny PNG whose header claims ``side`` x ``side`` pixels (a decompression bomb)."""
    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    struct.pack_into(">II", data, 16, side, side)  # IHDR width, height
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))  # IHDR CRC
    path.write_bytes(bytes(data))


def _write_corrupt(path: Path) -> None:
    path.write_bytes(b"this is not a png at all")


def _write_empty(path: Path) -> None:
    path.write_bytes(b"")


def _write_truncated(path: Path) -> None:
    Image.new("RGB", (32, 32), (200, 30, 30)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _write_png(path: Path) -> None:
    Image.new("RGB", (32, 32), (200, 30, 30)).save(path)


def _snapshot(root: Path, skip: Path | None) -> dict[str, str]:
    """``{relative path: sha256}`` of every file (and ``"dir"`` per directory) under ``root``,
    leaving out ``skip`` and everything below it."""
    found = {}
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        dirs[:] = [d for d in dirs if here / d != skip]
        for name in dirs:
            found[str((here / name).relative_to(root))] = "dir"
        for name in files:
            path = here / name
            if path == skip:
                continue
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "link"
            found[str(path.relative_to(root))] = digest
    return found


@dataclass(frozen=True)
class Outcome:
    """What one command did: its exit status, stderr, whether argparse refused the command
    line, and what it changed outside the folder it may write."""

    code: int
    err: str
    usage: bool
    changed: list[str]


def run_cli(argv: list[str], folder: Path, scratch: Path | None) -> Outcome:
    """``main(argv)`` run in ``folder`` (relative paths land in the snapshot), stderr captured;
    an exception it lets through fails the test (it would reach the user as a traceback)."""
    before = _snapshot(folder, scratch)
    err, usage = io.StringIO(), False
    with (
        _inside(folder),
        contextlib.redirect_stderr(err),
        contextlib.redirect_stdout(io.StringIO()),
    ):
        try:
            code = main(argv)
        except SystemExit as exit:  # argparse: usage + error lines, status 2
            code, usage = exit.code, True
        except Exception as error:
            raise AssertionError(f"uncaught {type(error).__name__}: {error}") from error
    after = _snapshot(folder, scratch)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    return Outcome(int(code or 0), err.getvalue(), usage, changed)


def check_error_line(argv: list[str], outcome: Outcome) -> None:
    """An error as users must see it: argparse's usage with status 2, or one line
    ``vlm-adapters COMMAND: error: ...``; never a traceback."""
    err = outcome.err
    assert "Traceback" not in err, err
    if outcome.usage:
        assert outcome.code == 2, err
        assert err.startswith("usage:") and "error:" in err, err
        return
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line for {argv}, got:\n{err}"
    assert lines[0].startswith(f"vlm-adapters {argv[0]}: error: "), err


@contextlib.contextmanager
def _inside(folder: Path) -> Iterator[None]:
    """The working directory is ``folder`` for the block."""
    previous = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


def check_case(case: Case, shared: Shared, tmp_path: Path) -> None:
    """Run ``case`` through the real CLI: one line naming ``case.expect`` (or argparse usage),
    exit status not 0, nothing changed outside the run's ``--out``."""
    call = case.setup(Env(tmp_path, shared))
    outcome = run_cli(call.argv, tmp_path, call.scratch)
    assert outcome.code != 0, f"exit status 0; stderr: {outcome.err}"
    check_error_line(call.argv, outcome)
    missing = [text for text in case.expect if text not in outcome.err]
    assert not missing, f"{missing} not named in: {outcome.err}"
    assert not outcome.changed, f"changed outside --out: {outcome.changed}"
    for path in call.absent:
        assert not path.exists(), f"{path} exists"
    if call.skipped is not None:
        log = call.skipped
        rows = [json.loads(line) for line in log.path.read_text().splitlines()]
        assert sorted(row["index"] for row in rows) == list(log.indices), rows
        for row in rows:
            assert row["id"] == f"align-{row['index']:05d}", row
            assert row["file"].endswith(log.data) and log.reason in row["reason"], row

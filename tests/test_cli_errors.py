"""How the command line reports errors: one line for bad input, a traceback for bugs."""

from __future__ import annotations

import pytest

from vlm_adapters.cli import main
from vlm_adapters.cli import merge as merge_command


def test_bad_input_is_one_line_without_a_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("VLM_ADAPTERS_DEBUG", raising=False)
    assert main(["merge", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and "nowhere" in err


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback_of_bad_input(tmp_path, capsys, monkeypatch, how):
    argv = ["merge", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]
    if how == "flag":
        argv.insert(0, "--debug")
    else:
        monkeypatch.setenv("VLM_ADAPTERS_DEBUG", "yes")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "CheckpointError" in err and "nowhere" in err.splitlines()[-1]


def test_a_bug_prints_its_traceback_and_asks_for_a_report(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("VLM_ADAPTERS_DEBUG", raising=False)

    def broken(args):  # noqa: ANN001, ANN202
        raise KeyError("internal state")

    monkeypatch.setattr(merge_command, "run", broken)
    assert main(["merge", str(tmp_path), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "KeyError: 'internal state'" in err
    assert "please report it" in err.splitlines()[-1]


@pytest.mark.parametrize(("value", "code"), [("0", 2), ("no", 2), ("", 2), ("maybe", 2)])
def test_the_debug_variable_is_read_strictly(tmp_path, capsys, monkeypatch, value, code):
    monkeypatch.setenv("VLM_ADAPTERS_DEBUG", value)
    assert main(["merge", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if value == "maybe":
        assert "VLM_ADAPTERS_DEBUG='maybe'" in err

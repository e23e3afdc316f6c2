"""`vlm-adapters list`: the table, `--json`, `--kind`, `--plugins`, and the console script."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vlm_adapters import plugins
from vlm_adapters.cli import main


def _json_rows(capsys: pytest.CaptureFixture[str], *args: str) -> list[dict[str, str]]:
    assert main(["list", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_list_json(capsys: pytest.CaptureFixture[str]) -> None:
    rows = _json_rows(capsys)
    assert all({"kind", "name", "provider"} <= set(row) for row in rows)
    by_kind = {
        k: {r["name"] for r in rows if r["kind"] == k} for k in ("vision", "connector", "llm")
    }
    assert len(by_kind["vision"]) >= 4 and {"hf", "timm", "open_clip", "fused"} <= by_kind["vision"]
    assert len(by_kind["connector"]) >= 5 and "pool" in by_kind["connector"]
    assert "hf" in by_kind["llm"]
    assert {r["provider"] for r in rows if r["name"] == "mlp"} == {"vlm-adapters"}


def test_list_kind_filter(capsys: pytest.CaptureFixture[str]) -> None:
    rows = _json_rows(capsys, "--kind", "connector")
    assert rows and {r["kind"] for r in rows} == {"connector"}


def test_list_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    mlp = next(line for line in lines if line.split()[:2] == ["connector", "mlp"])
    assert mlp.split()[2] == "vlm-adapters"
    assert any(line.split()[:3] == ["vision", "open_clip", "vlm-adapters"] for line in lines)


def test_list_table_ends_with_the_plugin_packages(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    components, packages = capsys.readouterr().out.split("\nplugin packages:\n")
    assert "connector  mlp" in components
    first = packages.splitlines()[0].split()
    assert first[:3] == ["vlm-adapters", importlib.metadata.version("vlm-adapters"), "loaded"]


def test_list_plugins_json(capsys: pytest.CaptureFixture[str]) -> None:
    rows = _json_rows(capsys, "--plugins")
    keys = {"package", "version", "status", "reason", "entry_points", "components"}
    assert rows and all(set(row) == keys for row in rows)
    assert all(row["status"] in plugins.STATUSES for row in rows)
    builtin = rows[0]
    assert builtin["package"] == "vlm-adapters" and builtin["status"] == "loaded"
    assert "connector:mlp" in builtin["components"] and builtin["entry_points"] == []
    for dist in ("vlm-adapters-convnext", "vlm-adapters-cabstractor"):  # installed with the repo
        row = next((r for r in rows if r["package"] == dist), None)
        if row is not None:
            assert row["version"] == importlib.metadata.version(dist)
            assert (row["status"], row["reason"]) == ("loaded", "")


def test_list_plugins_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "--plugins"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["vlm-adapters", importlib.metadata.version("vlm-adapters"),
                                    "loaded"]  # fmt: skip
    assert not any(line.startswith("connector ") for line in lines)  # packages only


def test_list_plugins_when_disabled(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(plugins.DISABLE_ENV, "1")
    plugins.reset()
    try:
        statuses = {r["package"]: r["status"] for r in _json_rows(capsys, "--plugins")}
    finally:
        monkeypatch.undo()
        plugins.reset()
    assert statuses.pop("vlm-adapters") == "loaded"
    assert set(statuses.values()) <= {"disabled"}  # installed plugins are listed, not loaded


def test_list_plugins_and_kind_exclude_each_other(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["list", "--plugins", "--kind", "llm"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_console_script() -> None:
    script = Path(sys.executable).parent / "vlm-adapters"
    env = {**os.environ, "VLM_ADAPTERS_DISABLE_PLUGINS": "1"}
    done = subprocess.run(
        [str(script), "list", "--json"], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert {r["provider"] for r in rows} == {"vlm-adapters"}  # entry points skipped
    assert len(rows) >= 10

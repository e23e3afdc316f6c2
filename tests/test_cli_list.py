"""`vlm-adapters list`: the table, `--json`, `--kind`, and the installed console script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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

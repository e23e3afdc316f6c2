"""`vlm-adapters new-plugin`: the generated packages install and pass their own tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vlm_adapters.cli import main
from vlm_adapters.scaffold import KINDS, new_plugin


@pytest.mark.parametrize(
    ("name", "kind", "match"),
    [
        ("Bad Name", "connector", "lower-case letters"),
        ("ok", "tokenizer", "unknown kind 'tokenizer'"),
        ("mlp", "connector", "a connector named 'mlp' already exists"),
    ],
)
def test_bad_requests_are_clear(tmp_path: Path, name: str, kind: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        new_plugin(name, kind, tmp_path)


def test_cli_writes_the_package_and_refuses_to_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["new-plugin", "my-proj", "--kind", "connector", "--out", str(tmp_path)]) == 0
    root = tmp_path / "vlm-adapters-my-proj"
    assert "wrote" in capsys.readouterr().out
    pyproject = (root / "pyproject.toml").read_text()
    assert '[project.entry-points.vlm_adapters]\nmy_proj = "vlm_adapters_my_proj.plugin"' in (
        pyproject
    )
    assert (root / "src/vlm_adapters_my_proj/component.py").is_file()
    assert main(["new-plugin", "my-proj", "--kind", "vision", "--out", str(tmp_path)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_generated_packages_install_and_pass_their_own_tests(tmp_path: Path) -> None:
    """A real pip install (into a --target dir, so the venv is untouched) of all three kinds."""
    roots = [new_plugin(f"scaffolded-{kind}", kind, tmp_path) for kind in KINDS]
    site = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*pip, "--target", str(site), *map(str, roots)], check=True, timeout=300)
    assert len(list(site.glob("vlm_adapters_scaffolded_*.dist-info"))) == 3
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    tests = [str(root / "tests") for root in roots]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "9 passed" in result.stdout

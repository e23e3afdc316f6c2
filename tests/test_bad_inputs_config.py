"""Bad config inputs through the real CLI: YAML that is not plain or gives a key twice,
checkpoint keys we never write, settings this machine or these samples cannot honour, smoke
names that are neither a type nor a tiny variant. Each ends in one line naming the key (or file,
or sample) and the fix, before anything trains (see tests/scripts/bad_input_kit.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from bad_input_kit import Call, Case, Env, Shared, check_case, make_shared  # noqa: E402


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Shared:
    return make_shared(tmp_path_factory)


def _override(id: str, override: str, *expect: str) -> Case:
    return Case(id, lambda env: env.train(override), expect)


def _duplicate_key_in_yaml(env: Env) -> Call:
    """tiny.yaml with ``recipe`` on lines 1 and 2 (and once more further down)."""
    call = env.train()
    path = env.root / "tiny.yaml"
    path.write_text("recipe: [align]\nrecipe: [align, finetune]\n" + path.read_text())
    return call


_PYTHON_TAG = "run.seed=!!python/object/apply:os.system [touch pwned]"

CASES = [
    _override("train-override-not-yaml", "run.seed=[1", "'run.seed=[1'", "not plain YAML"),
    # nothing runs: `touch pwned` would show as a new file in the case's folder
    _override("train-override-python-tag", _PYTHON_TAG, "!!python/object/apply:os.system"),
    _override(
        "train-override-duplicate-key",
        "run={seed: 1, seed: 2}",
        "duplicate key 'seed'",
        "give it once",
    ),
    Case(
        "train-yaml-duplicate-key",
        _duplicate_key_in_yaml,
        ("tiny.yaml:2: duplicate key 'recipe' (first on line 1)", "remove one"),
    ),
]


def _ids(cases: list[Case]) -> list[str]:
    return [case.id for case in cases]


@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_bad_config_input(
    case: Case,
    shared: Shared,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    check_case(case, shared, tmp_path, monkeypatch, capsys)

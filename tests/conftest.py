"""Shared fixtures: offline mode and the tiny tokenizer every tiny LLM uses."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402
from torch import nn  # noqa: E402

from vlm_adapters import VisionLanguageModel, build_vlm  # noqa: E402
from vlm_adapters.testing import tiny_model_config, tiny_tokenizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from bad_input_kit import Case, Shared, check_case, make_shared  # noqa: E402

# The input fuzzer (test_fuzz_inputs.py): the suite runs the same bounded examples every time;
# `pytest --hypothesis-profile deep` explores further.
settings.register_profile(
    "ci", max_examples=12, derandomize=True, database=None, deadline=None, print_blob=True
)
settings.register_profile("deep", max_examples=150, database=None, deadline=None)
settings.load_profile("ci")

# Tiny models: thread start-up and spinning cost far more than the maths on a shared machine.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Directory of the tiny word tokenizer (shapes + template vocabulary)."""
    return tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def _forced(model: VisionLanguageModel, token: str) -> VisionLanguageModel:
    """A copy of ``model`` (in eval mode) whose output head always picks ``token``."""
    clone = build_vlm(tiny_model_config(model.llm.cfg.tokenizer)).eval()
    clone.load_state_dict(model.state_dict())
    old = clone.llm.model.lm_head
    head = nn.Linear(old.in_features, old.out_features, bias=True)
    nn.init.zeros_(head.weight)
    with torch.no_grad():
        head.bias.fill_(-10.0)
        head.bias[clone.tokenizer.convert_tokens_to_ids(token)] = 10.0
    clone.llm.model.lm_head = head
    return clone


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Shared:
    """The bad-input tests' tiny config root, align run and checkpoint (one per module)."""
    return make_shared(tmp_path_factory)


@pytest.fixture
def run_case(shared: Shared, tmp_path: Path) -> Callable[[Case], None]:
    """``run_case(case)``: a bad-input case through the real CLI, with its checks."""
    return lambda case: check_case(case, shared, tmp_path)


@pytest.fixture
def forced():
    """``forced(model, token)``: a copy of a tiny model that always answers ``token``."""
    return _forced


_LOCK = Path(__file__).resolve().parents[1] / "requirements-lock.txt"
_SHOWN = ("torch", "torchvision", "transformers", "peft", "accelerate", "timm", "open_clip_torch")
_FAMILY_TEST = "test_llm_families.py::test_text_logits_match_the_llm_forward["


def pytest_sessionstart(session: pytest.Session) -> None:
    """Print the versions under test first (also under ``-q``)."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        for line in _versions():
            reporter.write_line(line)


def _versions() -> list[str]:
    """The versions under test, and whether they are the ones ``requirements-lock.txt`` pins."""
    shown = ", ".join(f"{name} {_installed(name)}" for name in _SHOWN)
    if not _LOCK.is_file():
        return [f"versions: {shown}", f"{_LOCK.name} not found"]
    locked = _locked()
    differ = [
        f"{name} {_installed(name)} (locked {pin})"
        for name, pin in sorted(locked.items())
        if _installed(name) not in (pin, None)
    ]
    where = f"all {len(locked)} pins of {_LOCK.name}" if not differ else "differs from the lock"
    lines = [f"versions: {shown} -- {where}"]
    if differ:
        lines.append(f"not the locked versions ({len(differ)}): {'; '.join(differ)}")
    return lines


def _locked() -> dict[str, str]:
    """``{distribution name: version}`` of the ``name==version`` lines of the lock."""
    pins = (line.split("#")[0].strip() for line in _LOCK.read_text().splitlines())
    return dict(pin.split("==", 1) for pin in pins if "==" in pin)


def _installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """How many transformers causal-LM families compose exactly, so that a drop is visible."""
    outcome: dict[str, str] = {}
    for key in ("passed", "skipped", "failed", "error"):
        for report in terminalreporter.stats.get(key, []):
            nodeid = getattr(report, "nodeid", "")
            if _FAMILY_TEST in nodeid and outcome.get(nodeid) not in ("failed", "error"):
                outcome[nodeid] = key
    if not outcome:
        return
    counts = {key: list(outcome.values()).count(key) for key in ("passed", "skipped")}
    failed = len(outcome) - counts["passed"] - counts["skipped"]
    terminalreporter.write_line(
        f"LLM families (transformers {_installed('transformers')}): {counts['passed']} of "
        f"{len(outcome)} compose exactly, {counts['skipped']} reported as not composable "
        f"(reasons above), {failed} failed"
    )

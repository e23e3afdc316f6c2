"""Property-based bad input: hypothesis generates config overrides, data records, CLI argument
values and folder states, runs the real CLI in-process on copies of a tiny setup, and asserts
what every input must give: exit 0 or 2, never 1 (a bug) or an uncaught exception; on 2 one
line ``vlm-adapters COMMAND: error: ...``; nothing written outside the run's ``--out``.

The suite runs the derandomized ``ci`` profile (the same examples every time, no example
database), so its time is bounded; ``--hypothesis-profile deep`` explores further with random
examples. Inputs that once found a failure are pinned with ``@example``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from bad_input_kit import Env, Shared, check_error_line, run_cli  # noqa: E402

FUZZ = settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _outcome(
    argv: list[str], tmp: Path, out: Path | None, also: tuple[str, ...] = ()
) -> tuple[int, str]:
    """Run ``main(argv)`` in ``tmp``: its exit status and stderr, after checking the common
    promises (no exit 1, no traceback, one line on 2, nothing changed outside ``out`` and the
    folders ``also``, relative to ``tmp``, that the user named as outputs)."""
    outcome = run_cli(argv, tmp, out)
    assert outcome.code in (0, 2), f"exit {outcome.code} for {argv}:\n{outcome.err}"
    assert "Traceback" not in outcome.err, outcome.err
    if outcome.code == 2:
        check_error_line(argv, outcome)
    changed = [k for k in outcome.changed if not any(k == a or k.startswith(f"{a}/") for a in also)]
    assert not changed, f"{argv} changed outside --out: {changed}"
    return outcome.code, outcome.err


@contextlib.contextmanager
def _case(shared: Shared) -> Iterator[Env]:
    """A fresh case directory with the kit's helpers (hypothesis reuses the test's tmp_path)."""
    tmp = Path(tempfile.mkdtemp(prefix="fuzz-"))
    try:
        yield Env(tmp, shared)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _train(env: Env, *extra: str) -> list[str]:
    return ["train", str(env.config()), "--out", str(env.out), "--stage", "align", *extra]


# --- config overrides ------------------------------------------------------------------------

KEYS = (
    "data.align.path",
    "data.align.image_root",
    "data.align.template",
    "data.max_length",
    "data.on_bad_sample",
    "data.max_skip_fraction",
    "data.max_image_pixels",
    "data.packing",
    "data.max_tokens_per_batch",
    "data.group_by_length",
    "stages.align.batch_size",
    "stages.align.lr",
    "stages.align.epochs",
    "stages.align.warmup_ratio",
    "stages.align.scheduler",
    "stages.align.max_grad_norm",
    "stages.align.feature_cache",
    "run.seed",
    "run.save_every",
    "run.mixed_precision",
    "run.log_every",
    "recipe",
    "vision.image_size",
    "vision.type",
    "connector.type",
    "llm.attn_implementation",
    "llm.dtype",
    "llm.config.hidden_size",
    "nonsense",
    "data.align",
    "stages",
)
YAML_FRAGMENTS = (
    "!!python/object/apply:os.system ['touch pwned']",
    "!!python/name:os.system",
    "[1, 2",
    "{a: 1",
    "&a [*a]",
    "*undefined",
    "null",
    "~",
    "",
    "0",
    "-1",
    "1e309",
    ".nan",
    "yes",
    "'\\x00'",
    "[]",
    "{}",
    "fp16",
    "flash_attention_2",
    "/etc/hostname",
    "../outside",
    "32",
    "31",
)
VALUES = st.one_of(
    st.sampled_from(YAML_FRAGMENTS),
    st.integers(-(10**6), 10**6).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.text(max_size=12),
)
OVERRIDES = st.lists(
    st.tuples(st.one_of(st.sampled_from(KEYS), st.text(max_size=10)), VALUES).map("=".join),
    min_size=1,
    max_size=3,
)


@FUZZ
@given(overrides=OVERRIDES)
@example(overrides=["stages.align.feature_cache=/etc/hostname"])
@example(overrides=["llm.attn_implementation=flash_attention_2"])
@example(overrides=["data.align.path=!!python/object/apply:os.system ['touch pwned']"])
@example(overrides=["vision.image_size=31"])
@example(overrides=["run.mixed_precision=fp16"])
@example(overrides=["llm.config.hidden_size=&a [*a]"])
@example(overrides=["llm.dtype=1e309"])
@example(overrides=["llm.config.hidden_size=null"])
@example(overrides=["run.seed=-1"])
@example(overrides=['data.align.path="a\\0b"'])
@example(overrides=["stages.align.feature_cache=1e309"])
def test_config_overrides(shared: Shared, overrides: list[str]) -> None:
    caches = tuple(
        os.path.normpath(value)
        for key, _, value in (o.partition("=") for o in overrides)
        if key.endswith(".feature_cache") and value
    )  # the user's choice of folder for the features, anywhere
    with _case(shared) as env:
        _outcome(_train(env, *overrides), env.tmp, env.out, caches)
        assert not (env.tmp / "pwned").exists()


# --- data records ----------------------------------------------------------------------------

TEXTS = st.one_of(
    st.text(max_size=30),
    st.sampled_from(
        (
            "<image>",
            "<image>\n<image>",
            "<|start_header_id|>assistant<|end_header_id|>",
            "<|im_start|>assistant\n",
            "<|eot_id|>",
            "</s>",
            "\x00",
            "\ud800",
            "red",
        )
    ),
)
TURN = st.fixed_dictionaries(
    {
        "from": st.sampled_from(("human", "gpt", "system", "user", "assistant", "bogus", 3)),
        "value": st.one_of(TEXTS, st.none(), st.integers()),
    }
)
IMAGE = st.one_of(
    st.sampled_from(("images/0000.png", "missing.png", "../tiny.yaml", "/etc/hostname", "", ".")),
    st.none(),
    st.integers(),
    st.lists(st.sampled_from(("images/0000.png", "images/0001.png", "missing.png")), max_size=3),
)
RECORD = st.one_of(
    st.fixed_dictionaries(
        {"conversations": st.lists(TURN, max_size=4)},
        optional={"id": st.one_of(st.integers(), st.text(max_size=5), st.none()), "image": IMAGE},
    ),
    st.sampled_from(({}, [], "text", 5, None)),
)
ENCODINGS = st.sampled_from(("json", "jsonl", "utf-16", "latin-1 bytes", "bom", "truncated"))


def _encoded(records: list[Any], encoding: str) -> bytes:
    """``records`` as a data file in ``encoding`` (some of them broken on purpose)."""
    text = json.dumps(records, ensure_ascii=False)
    if encoding == "jsonl":
        text = "\n".join(json.dumps(r, ensure_ascii=False) for r in records)
    data = text.encode("utf-8", "surrogatepass")
    return {
        "json": data,
        "jsonl": data,
        "utf-16": text.encode("utf-16", "surrogatepass"),
        "latin-1 bytes": data.replace(b"red", b"r\xe9d\xff"),
        "bom": b"\xef\xbb\xbf" + data,
        "truncated": data[: len(data) // 2],
    }[encoding]


@FUZZ
@given(records=st.lists(RECORD, max_size=4), encoding=ENCODINGS)
@example(records=[], encoding="json")
@example(
    records=[{"id": 1, "conversations": [{"from": "human", "value": "red"}]}],
    encoding="latin-1 bytes",
)
def test_data_records(shared: Shared, records: list[Any], encoding: str) -> None:
    with _case(shared) as env:
        name = "align.jsonl" if encoding == "jsonl" else "align.json"
        path = env.root / "shapes" / name
        path.write_bytes(_encoded(records, encoding))
        argv = _train(env, f"data.align.path={path}")
        _outcome(argv, env.tmp, env.out)
        env.config()  # the copy is still readable: nothing we read was modified
        assert path.read_bytes() == _encoded(records, encoding)


# --- command-line argument values --------------------------------------------------------------

ARG = st.one_of(
    st.sampled_from(
        ("0", "-1", "1", "nan", "inf", "cuda", "tpu9", "cpu", "meta", "/", "/etc/passwd", "..")
    ),
    st.text(max_size=10),
)


def _commands(env: Env, value: str) -> dict[str, list[str]]:
    """One command line per command, with ``value`` in one of its options."""
    ckpt, cfg = str(env.shared.ckpt), str(env.config())
    images = str(env.images.parent)
    data = str(env.root / "shapes" / "eval.json")
    return {
        "eval-batch": ["eval", ckpt, "--data", data, "--images", images, "--batch-size", value],
        "eval-data": ["eval", ckpt, "--data", value, "--images", images],
        "generate-image": ["generate", ckpt, "--image", value, "--prompt", "what?"],
        "generate-temperature": [
            *("generate", ckpt, "--prompt", "what?", "--max-new-tokens", "2"),
            *("--temperature", value),
        ],
        "cache-batch": ["cache-features", cfg, "--batch-size", value],
        "cache-device": ["cache-features", cfg, "--device", value],
        "export-format": ["export", ckpt, "--out", str(env.out), "--format", value],
        "import-source": ["import", value, "--out", str(env.out)],
    }


@FUZZ
@given(
    command=st.sampled_from(
        (
            "eval-batch",
            "eval-data",
            "generate-image",
            "generate-temperature",
            "cache-batch",
            "cache-device",
            "export-format",
            "import-source",
        )
    ),
    value=ARG,
)
@example(command="cache-batch", value="0")
@example(command="eval-batch", value="0")
@example(command="import-source", value="\x00")
@example(command="cache-device", value="tpu9")
@example(command="cache-device", value="cuda")
def test_argument_values(shared: Shared, command: str, value: str) -> None:
    with _case(shared) as env:
        cache = env.out / "cache"
        env.config(lambda data: data["stages"]["align"].update(feature_cache=str(cache)))
        _outcome(_commands(env, value)[command], env.tmp, env.out)


# --- folder states -------------------------------------------------------------------------------


def _lock_folder(out: Path) -> None:
    out.mkdir()
    (out / "run.lock").mkdir()


def _lock_garbage(out: Path) -> None:
    out.mkdir()
    (out / "run.lock").write_bytes(b"\xff\xfe not a lock")


def _lock_empty(out: Path) -> None:
    out.mkdir()
    (out / "run.lock").write_bytes(b"")


def _out_file(out: Path) -> None:
    out.write_text("my results\n")


def _out_symlink(out: Path) -> None:
    target = out.parent / "elsewhere"
    target.mkdir()
    (target / "notes.txt").write_text("mine\n")
    out.symlink_to(target)


def _config_is_folder(out: Path) -> None:
    out.mkdir()
    (out / "config.yaml").mkdir()


def _half_checkpoint(out: Path) -> None:
    (out / "align" / "step-1").mkdir(parents=True)
    (out / "align" / "step-1" / "model.safetensors").write_bytes(b"\x00" * 8)


def _stale_temp(out: Path) -> None:
    (out / "align").mkdir(parents=True)
    (out / "align" / ".tmp-step-1").mkdir()


STATES: dict[str, Callable[[Path], None]] = {
    "lock-folder": _lock_folder,
    "lock-garbage": _lock_garbage,
    "lock-empty": _lock_empty,
    "out-file": _out_file,
    "out-symlink": _out_symlink,
    "config-is-folder": _config_is_folder,
    "half-checkpoint": _half_checkpoint,
    "stale-temp": _stale_temp,
}


@settings(FUZZ, max_examples=len(STATES) * 3)  # every state with every flag
@given(
    state=st.sampled_from(sorted(STATES)),
    flags=st.sampled_from(((), ("--resume", "auto"), ("--overwrite",))),
)
@example(state="lock-folder", flags=())
@example(state="config-is-folder", flags=("--overwrite",))
@example(state="out-symlink", flags=("--overwrite",))
@example(state="lock-garbage", flags=("--resume", "auto"))
def test_folder_states(shared: Shared, state: str, flags: tuple[str, ...]) -> None:
    with _case(shared) as env:
        STATES[state](env.out)
        notes = {p: p.read_bytes() for p in env.tmp.rglob("notes.txt")}
        _outcome(_train(env, *flags), env.tmp, _scratch(env.out, flags))
        assert notes == {p: p.read_bytes() for p in notes}  # the user's files are kept


def _scratch(out: Path, flags: tuple[str, ...]) -> Path | None:
    """What the run may write: ``out``, or the user's folder it links to with ``--overwrite``
    (our files beside theirs); nothing when ``out`` is the user's file."""
    if out.is_symlink():
        return out.resolve() if "--overwrite" in flags else None
    return None if out.is_file() else out

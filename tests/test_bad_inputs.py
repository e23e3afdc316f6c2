"""Bad inputs through the real CLI: every refused config, dataset, image, checkpoint and
argument ends in one line that names the culprit, with no traceback and no file outside the
run's ``--out`` changed.

Each case is ``(id, setup, expected substrings)``: ``setup`` prepares its files under the test's
own ``tmp_path`` (copies of the shared tiny config, run and checkpoint) and returns the argv.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from bad_input_kit import (  # noqa: E402
    Call,
    Case,
    Edit,
    Env,
    SkipLog,
    _drop,
    _set,
    _write_bomb,
    _write_corrupt,
    _write_empty,
    _write_png,
    _write_truncated,
)

# --- training: config errors ----------------------------------------------------------------


def _config_case(id: str, edit: Edit, *expect: str) -> Case:
    """The YAML changed by ``edit``: the error names ``expect`` and the YAML file."""
    return Case(id, lambda env: env.train(edit=edit), (*expect, "tiny.yaml"))


def _override_case(id: str, override: str, *expect: str, file: bool = True) -> Case:
    """A ``key=value`` override: the error names ``expect`` (and the YAML file if ``file``)."""
    named = (*expect, "tiny.yaml") if file else expect
    return Case(id, lambda env: env.train(override), named)


def _timm_loader(data: dict[str, Any]) -> None:
    data["vision"] = {
        "type": "timm",
        "model": "vit_tiny_patch16_224",
        "pretrained": False,
        "model_kwargs": {"checkpoint_path": "/x.pt"},
    }


def _open_clip_loader(data: dict[str, Any]) -> None:
    data["vision"] = {"type": "open_clip", "model": "ViT-B-32", "model_kwargs": {"cache_dir": "/c"}}


def _llm_from_missing_dir(env: Env) -> Call:
    missing = env.tmp / "no-such-llm"
    return env.train(edit=_set("llm", {"type": "hf", "model": str(missing)}))


def _yaml_file(text: str) -> Callable[[Env], Call]:
    def setup(env: Env) -> Call:
        path = env.tmp / "broken.yaml"
        path.write_text(text)
        return Call(["train", str(path), "--out", str(env.out)], scratch=env.out)

    return setup


def _missing_finetune_section(env: Env) -> Call:
    call = env.train(stage="all", edit=_drop("data.finetune"))
    call.absent = (env.out / "align" / "final",)
    return call


def _bad_finetune_data(env: Env) -> Call:
    env.write_data("[{,}]", "finetune.json")
    call = env.train(stage="all")
    call.absent = (env.out / "align" / "final",)
    return call


def _path_case(id: str, key: str, name: str, *expect: str, file: bool = False) -> Case:
    """The YAML sets ``key`` to ``name`` in the case's directory (a file there if ``file``,
    else nothing): the error names the key, the path and the YAML file."""

    def setup(env: Env) -> Call:
        if file:
            (env.tmp / name).write_text("a file, not a directory\n")
        return env.train(edit=_set(key, str(env.tmp / name)))

    return Case(id, setup, (key, name, "tiny.yaml", *expect))


CONFIG_CASES = [
    _override_case("train-unknown-key", "run.save_evry=5", "run.save_evry"),
    _config_case("train-unknown-key-in-yaml", _set("stages.align.lrr", 1), "stages.align.lrr"),
    _config_case("train-unknown-top-level-key", _set("trainer", {}), "trainer"),
    _override_case("train-wrong-type", "stages.align.batch_size=abc", "stages.align.batch_size"),
    _config_case("train-wrong-type-in-yaml", _set("run.seed", [1, 2]), "run.seed"),
    _override_case("train-negative-lr", "stages.align.lr=-1", "stages.align.lr"),
    _override_case("train-bad-scheduler", "stages.align.scheduler=cosin", "stages.align.scheduler"),
    _override_case("train-bad-skip-policy", "data.on_bad_sample=ignore", "data.on_bad_sample"),
    _override_case("train-unknown-connector-type", "connector.type=mpl", "connector.type", "'mlp'"),
    _override_case("train-unknown-vision-type", "vision.type=timn", "vision.type", "'timm'"),
    _override_case("train-unknown-llm-type", "llm.type=hff", "llm.type", "'hf'"),
    _override_case("train-override-without-equals", "foo", "'foo'", "KEY=VALUE", file=False),
    _override_case("train-override-into-scalar", "run.seed.x=1", "run.seed.x", file=False),
    _override_case("train-unknown-stage-in-recipe", "recipe=[align, pretrain]", "pretrain"),
    _override_case("train-empty-recipe", "recipe=[]", "recipe"),
    _override_case("train-unknown-template", "data.align.template=nope", "data.align.template"),
    _override_case("train-max-length-over-context", "data.max_length=100000", "data.max_length"),
    _config_case("train-missing-llm-section", _drop("llm"), "section(s): llm"),
    _config_case(
        "train-feature-layer-out-of-range", _set("vision.feature_layer", 40), "vision.feature_layer"
    ),
    _config_case("train-timm-loader-kwargs", _timm_loader, "checkpoint_path", "not allowed"),
    _config_case("train-open-clip-loader-kwargs", _open_clip_loader, "cache_dir", "not allowed"),
    _config_case("train-inline-llm-auto-map", _set("llm.config.auto_map", {"x": "y"}), "auto_map"),
    _override_case(
        "train-attn-hub-kernel", "llm.attn_implementation=some/hub-kernel", "some/hub-kernel"
    ),
    _config_case(
        "train-inline-attn-hub-kernel",
        _set("llm.config.attn_implementation", "org/kernel"),
        "org/kernel",
    ),
    Case(
        "train-llm-missing-dir",
        _llm_from_missing_dir,
        ("llm.model", "cannot load", "no-such-llm", "tiny.yaml"),
    ),
    _path_case("train-llm-tokenizer-missing", "llm.tokenizer", "no-tokenizer", "cannot load"),
    Case("train-missing-finetune-section", _missing_finetune_section, ("data.finetune",)),
    _path_case("train-data-path-missing", "data.align.path", "nope.json"),
    _path_case("train-image-root-not-a-dir", "data.align.image_root", "notes.txt", file=True),
    Case(
        "train-missing-yaml",
        lambda env: Call(["train", str(env.tmp / "absent.yaml"), "--out", str(env.out)], env.out),
        ("absent.yaml",),
    ),
    Case("train-invalid-yaml", _yaml_file("model: [1, 2\n  x: {"), ("broken.yaml", "YAML")),
    Case("train-yaml-not-a-mapping", _yaml_file("- 1\n- 2\n"), ("broken.yaml",)),
]


# --- training: dataset errors ---------------------------------------------------------------


def _data_case(id: str, content: Any, *expect: str, name: str = "align.json") -> Case:
    """A case whose align data file holds ``content`` (``name`` becomes data.align.path)."""

    def setup(env: Env) -> Call:
        path = env.write_data(content(env) if callable(content) else content, name)
        return env.train(f"data.align.path={path}")

    return Case(id, setup, expect)


def _no_conversations(env: Env) -> list[dict[str, Any]]:
    records = env.records()
    del records[2]["conversations"]
    return records


def _jsonl(env: Env, bad: str) -> str:
    lines = [json.dumps(r) for r in env.records()]
    lines[1] = bad
    return "\n".join(lines) + "\n"


DATA_FILE_CASES = [
    _data_case("train-malformed-json", '[\n{"id": "a",, }\n]', "align.json:2", "malformed"),
    _data_case("train-json-object-not-list", {"id": "a"}, "align.json", "list"),
    _data_case("train-json-not-a-record", [1, 2], "align.json", "conversations"),
    _data_case("train-record-without-conversations", _no_conversations, "align.json", "sample 2"),
    _data_case(
        "train-jsonl-bad-line",
        lambda env: _jsonl(env, "{oops"),
        "align.jsonl:2",
        name="align.jsonl",
    ),
    _data_case(
        "train-jsonl-line-without-conversations",
        lambda env: _jsonl(env, '{"id": "x"}'),
        "align.jsonl:2",
        "conversations",
        name="align.jsonl",
    ),
    _data_case("train-empty-dataset", [], "align.json", "no samples"),
    _data_case("train-empty-jsonl", "\n", "align.jsonl", "no samples", name="align.jsonl"),
]


Spoil = Callable[[Env, tuple[int, ...]], Any]
"""Makes samples ``indices`` of the case's align set bad."""
ALL = tuple(range(8))  # every sample of the tiny align set


def _skip_case(id: str, spoil: Spoil, reason: str, indices: tuple[int, ...] = ALL) -> Case:
    """Spoil samples ``indices``: the default skip policy lists them in skipped.jsonl, and
    the run fails (more than data.max_skip_fraction of the 8 samples are skipped)."""

    def setup(env: Env) -> Call:
        spoil(env, indices)
        call = env.train()
        call.skipped = SkipLog(env.out / "align" / "skipped.jsonl", "align.json", reason, indices)
        return call

    return Case(id, setup, ("skipped.jsonl", "data.max_skip_fraction"))


def _images(write: Callable[[Path], Any]) -> Spoil:
    """``write`` over the image of each spoilt sample."""
    return lambda env, indices: [write(env.images / f"train_{i:05d}.png") for i in indices]


def _records(change: Callable[[Env, dict[str, Any]], Any]) -> Spoil:
    """``change(env, record)`` on each spoilt record of align.json."""

    def spoil(env: Env, indices: tuple[int, ...]) -> None:
        records = env.records()
        for index in indices:
            change(env, records[index])
        env.write_data(records)

    return spoil


def _outside(env: Env, record: dict[str, Any]) -> None:
    _write_png(env.tmp / "outside.png")
    record["image"] = "../../outside.png"


def _symlink_out(env: Env, record: dict[str, Any]) -> None:
    _write_png(env.tmp / "outside.png")
    link = env.images / f"link-{record['id']}.png"
    link.symlink_to(env.tmp / "outside.png")
    record["image"] = f"images/{link.name}"


def _over_max_pixels(env: Env, indices: tuple[int, ...]) -> None:
    """2000x1000 images with ``data.max_image_pixels`` set to 1,000,000."""
    _images(lambda path: Image.new("L", (2000, 1000)).save(path))(env, indices)
    env.config(_set("data.max_image_pixels", 1_000_000))


def _turn(index: int, **values: Any) -> Callable[[Env, dict[str, Any]], Any]:
    """Update turn ``index`` of a record's conversation."""
    return lambda env, record: record["conversations"][index].update(values)


SKIP_CASES = [
    _skip_case("train-all-images-missing", _images(Path.unlink), "image missing"),
    _skip_case(
        "train-absolute-image-paths",
        _records(lambda env, record: record.update(image="/etc/passwd")),
        "image outside image_root",
    ),
    _skip_case("train-image-climbs-out", _records(_outside), "image outside image_root"),
    _skip_case("train-symlink-out-of-root", _records(_symlink_out), "image outside image_root"),
    _skip_case("train-corrupt-images", _images(_write_corrupt), "image unreadable"),
    _skip_case("train-one-corrupt-image", _images(_write_corrupt), "image unreadable", (5,)),
    _skip_case("train-zero-byte-images", _images(_write_empty), "image unreadable"),
    _skip_case("train-truncated-images", _images(_write_truncated), "image unreadable"),
    _skip_case("train-decompression-bombs", _images(_write_bomb), "image too large"),
    _skip_case("train-image-over-max-pixels", _over_max_pixels, "image too large"),
    _skip_case(
        "train-image-marker-mismatch",
        _records(_turn(0, value="<image>\n<image>\n")),
        "image marker mismatch",
        (3,),
    ),
    _skip_case(
        "train-unknown-role", _records(_turn(-1, **{"from": "robot"})), "bad conversation", (3,)
    ),
    _skip_case(
        "train-no-assistant-turn",
        _records(lambda env, record: record.update(conversations=record["conversations"][:1])),
        "bad conversation",
        (6,),
    ),
    _skip_case(
        "train-conversation-too-long", _records(_turn(-1, value="red " * 400)), "too long", (2,)
    ),
    _skip_case(
        "train-bad-image-field",
        _records(lambda env, record: record.update(image=5)),
        "bad image field",
        (1, 7),
    ),
]


def _error_policy(spoil: Spoil, index: int) -> Callable[[Env], Call]:
    """Spoil sample ``index`` and train with ``data.on_bad_sample=error``."""

    def setup(env: Env) -> Call:
        spoil(env, (index,))
        return env.train("data.on_bad_sample=error")

    return setup


ERROR_POLICY_CASES = [
    Case(
        "train-error-policy-missing-image",
        _error_policy(_images(Path.unlink), 3),
        ("'align-00003'", "index 3", "image missing"),
    ),
    Case(
        "train-error-policy-corrupt-image",
        _error_policy(_images(_write_corrupt), 5),
        ("'align-00005'", "index 5", "image unreadable"),
    ),
    Case(
        "train-error-policy-unknown-role",
        _error_policy(_records(_turn(-1, **{"from": "robot"})), 4),
        ("'align-00004'", "index 4", "robot"),
    ),
    Case(
        "train-error-policy-too-long",
        _error_policy(_records(_turn(-1, value="red " * 400)), 6),
        ("'align-00006'", "index 6", "too long"),
    ),
    Case("train-bad-finetune-data-before-align", _bad_finetune_data, ("finetune.json",)),
]


# --- training: output directory and resume errors -------------------------------------------


def _into(out: Callable[[Env], Path], *extra: str, stage: str = "align") -> Callable:
    """``train`` into ``out(env)``, an existing path that must stay exactly as it was."""

    def setup(env: Env) -> Call:
        target = out(env)
        argv = ["train", str(env.config()), "--out", str(target), "--stage", stage, *extra]
        return Call(argv)

    return setup


def _a_file(env: Env) -> Path:
    path = env.tmp / "results.txt"
    path.write_text("not a directory\n")
    return path


def _locked_run(env: Env) -> Path:
    run = env.run()
    lock = {"pid": os.getpid(), "host": socket.gethostname(), "started": "x", "command": "y"}
    (run / "run.lock").write_text(json.dumps(lock))
    return run


def _resume(path: Callable[[Path], Path]) -> Callable[[Env], Call]:
    """``train --resume path(run)`` into a copy of the shared run (which must stay as it was)."""

    def setup(env: Env) -> Call:
        run = env.run()
        argv = ["train", str(env.config()), "--out", str(run), "--stage", "align"]
        return Call([*argv, "--resume", str(path(run))])

    return setup


def _step(run: Path) -> Path:
    return run / "align" / "checkpoints" / "step-000001"


def _truncated_step(run: Path) -> Path:
    weights = _step(run) / "optimizer.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return _step(run)


def _step_without_state(run: Path) -> Path:
    (_step(run) / "trainer_state.json").unlink()
    return _step(run)


def _not_a_step(run: Path) -> Path:
    path = run.parent / "somewhere"
    path.mkdir()
    return path


OUTPUT_CASES = [
    Case("train-out-user-dir", _into(lambda env: env.user_dir()), ("--overwrite", "mine")),
    Case("train-out-is-a-file", _into(_a_file), ("results.txt",)),
    Case("train-stage-already-done", _into(lambda env: env.run()), ("--resume auto", "run/align")),
    Case(
        "train-finetune-without-connector",
        lambda env: env.train(stage="finetune"),
        ("--fresh-connector", "connector"),
    ),
    Case("train-live-lock", _into(_locked_run), ("in use by another run", "run.lock")),
    Case(
        "train-resume-missing-checkpoint",
        _resume(lambda run: run / "align" / "checkpoints" / "step-000099"),
        ("step-000099",),
    ),
    Case(
        "train-resume-truncated-checkpoint", _resume(_truncated_step), ("step-000001", "truncated")
    ),
    Case(
        "train-resume-incomplete-checkpoint",
        _resume(_step_without_state),
        ("step-000001", "trainer_state.json"),
    ),
    Case("train-resume-not-a-checkpoint", _resume(_not_a_step), ("somewhere", "--resume")),
    Case(
        "train-resume-changed-config",
        _into(lambda env: env.run(), "--resume", "auto", "stages.align.lr=0.5"),
        ("stages.align.lr", "--allow-config-change"),
    ),
]


# --- checkpoints: eval, generate, export, merge, import -------------------------------------


def _eval(ckpt: Path, env: Env, data: Path | None = None, images: Path | None = None) -> Call:
    data = data or env.root / "shapes" / "eval.json"
    return Call(["eval", str(ckpt), "--data", str(data), "--images", str(images or data.parent)])


def _generate(ckpt: Path, image: Path | None = None) -> Call:
    argv = ["generate", str(ckpt), "--prompt", "what colour?", "--max-new-tokens", "2"]
    return Call(argv + (["--image", str(image)] if image else []))


def _export(ckpt: Path, env: Env, command: str = "export") -> Call:
    return Call([command, str(ckpt), "--out", str(env.out)], scratch=env.out)


COMMANDS: dict[str, Callable[[Path, Env], Call]] = {
    "eval": _eval,
    "generate": lambda ckpt, env: _generate(ckpt),
    "export": _export,
    "merge": lambda ckpt, env: _export(ckpt, env, "merge"),
}


def _ckpt_cases(
    what: str, spoil: Callable[[Env], Path], expect: tuple[str, ...], *commands: str
) -> list[Case]:
    """One case per command: ``spoil(env)`` returns the (bad) checkpoint it gets."""
    return [
        Case(f"{command}-{what}", lambda env, c=command: COMMANDS[c](spoil(env), env), expect)
        for command in commands
    ]


def _without(name: str) -> Callable[[Env], Path]:
    def spoil(env: Env) -> Path:
        path = env.ckpt()
        (path / name).unlink()
        return path

    return spoil


def _config_text(text: str) -> Callable[[Env], Path]:
    def spoil(env: Env) -> Path:
        path = env.ckpt()
        (path / "config.json").write_text(text)
        return path

    return spoil


def _weights(cut: Callable[[bytes], bytes]) -> Callable[[Env], Path]:
    def spoil(env: Env) -> Path:
        path = env.ckpt()
        weights = path / "model.safetensors"
        weights.write_bytes(cut(weights.read_bytes()))
        return path

    return spoil


def _edited(edit: Edit) -> Callable[[Env], Path]:
    return lambda env: env.ckpt(edit)


def _open_clip_file(config: dict[str, Any]) -> None:
    config["vision"] = {
        "type": "open_clip",
        "model": "ViT-B-32",
        "pretrained": "/some/weights.pt",
        "model_kwargs": {"embed_dim": 16},
    }


CHECKPOINT_CASES = [
    *_ckpt_cases(
        "missing-checkpoint",
        lambda env: env.tmp / "no-ckpt",
        ("no-ckpt",),
        "eval",
        "generate",
        "export",
        "merge",
    ),
    *_ckpt_cases(
        "no-config-json", _without("config.json"), ("config.json",), "eval", "generate", "export"
    ),
    *_ckpt_cases(
        "config-not-json", _config_text("{not json"), ("config.json",), "eval", "export", "merge"
    ),
    *_ckpt_cases(
        "foreign-format",
        _edited(_set("format", "other-tool")),
        ("config.json", "other-tool"),
        "generate",
        "export",
    ),
    *_ckpt_cases(
        "zero-byte-weights",
        _weights(lambda data: b""),
        ("model.safetensors", "truncated"),
        "generate",
        "merge",
    ),
    *_ckpt_cases(
        "truncated-weights",
        _weights(lambda data: data[: len(data) - 1000]),
        ("model.safetensors", "truncated"),
        "eval",
        "export",
    ),
    *_ckpt_cases(
        "weights-missing", _without("model.safetensors"), ("model.safetensors",), "generate"
    ),
    *_ckpt_cases(
        "asks-trust-remote-code",
        _edited(_set("llm.trust_remote_code", True)),
        ("--trust-remote-code", "config.json"),
        "generate",
        "eval",
        "export",
        "merge",
    ),
    *_ckpt_cases(
        "vision-model-outside",
        _edited(_set("vision", {"type": "hf", "model": "/some/path"})),
        ("outside the checkpoint", "vision.model"),
        "generate",
        "export",
    ),
    *_ckpt_cases(
        "open-clip-pretrained-file",
        _edited(_open_clip_file),
        ("outside the checkpoint", "/some/weights.pt"),
        "generate",
    ),
    *_ckpt_cases(
        "tokenizer-outside",
        _edited(_set("llm.tokenizer", "/elsewhere/tokenizer")),
        ("outside the checkpoint", "llm.tokenizer"),
        "generate",
    ),
    *_ckpt_cases(
        "unknown-template", _edited(_set("template", "nope")), ("'nope'",), "generate", "eval"
    ),
    *_ckpt_cases(
        "missing-plugin",
        _edited(_set("connector.type", "not-installed-connector")),
        ("not-installed-connector",),
        "generate",
    ),
    *_ckpt_cases("without-lora", lambda env: env.ckpt(), ("nothing to merge",), "merge"),
]


# --- images and records in eval / generate --------------------------------------------------


def _generate_image(write: Callable[[Path], None] | None, name: str) -> Callable[[Env], Call]:
    def setup(env: Env) -> Call:
        image = env.tmp / name
        if write is not None:
            write(image)
        return _generate(env.ckpt(), image)

    return setup


def _eval_record(image: str, write: Callable[[Path], None] | None = None) -> Callable[[Env], Call]:
    """``eval`` of one record about ``image`` (relative to the images dir), made by ``write``."""

    def setup(env: Env) -> Call:
        images = env.tmp / "images"
        images.mkdir()
        if write is not None:
            write(images / image)
        record = {
            "id": "q-7",
            "image": image,
            "conversations": [
                {"from": "human", "value": "<image>\nwhat colour is it?"},
                {"from": "gpt", "value": "red"},
            ],
        }
        data = env.tmp / "questions.json"
        data.write_text(json.dumps([record]))
        return _eval(env.ckpt(), env, data, images)

    return setup


def _eval_data(text: str, name: str = "questions.json") -> Callable[[Env], Call]:
    def setup(env: Env) -> Call:
        data = env.tmp / name
        data.write_text(text)
        return _eval(env.ckpt(), env, data, env.images)

    return setup


_NO_ANSWER = [{"id": "q-9", "conversations": [{"from": "human", "value": "what?"}]}]

IMAGE_CASES = [
    Case("generate-image-missing", _generate_image(None, "gone.png"), ("gone.png",)),
    Case("generate-image-corrupt", _generate_image(_write_corrupt, "bad.png"), ("bad.png",)),
    Case("generate-image-zero-byte", _generate_image(_write_empty, "empty.png"), ("empty.png",)),
    Case("generate-image-truncated", _generate_image(_write_truncated, "half.png"), ("half.png",)),
    Case(
        "generate-decompression-bomb",
        _generate_image(_write_bomb, "bomb.png"),
        ("bomb.png", "too large"),
    ),
    Case("eval-image-missing", _eval_record("gone.png"), ("gone.png",)),
    Case("eval-image-corrupt", _eval_record("bad.png", _write_corrupt), ("bad.png",)),
    Case("eval-decompression-bomb", _eval_record("bomb.png", _write_bomb), ("bomb.png",)),
    Case(
        "eval-image-escapes-images-dir", _eval_record("../x.png", _write_png), ("q-7", "../x.png")
    ),
    Case("eval-absolute-image-path", _eval_record("/etc/hostname"), ("q-7", "/etc/hostname")),
    Case("eval-malformed-json", _eval_data('[\n{"id": 1,,}\n]'), ("questions.json:2",)),
    Case(
        "eval-jsonl-bad-line",
        _eval_data('{"conversations": []}\nnope\n', "questions.jsonl"),
        ("questions.jsonl:2",),
    ),
    Case("eval-data-missing", lambda env: _eval(env.ckpt(), env, env.tmp / "q.json"), ("q.json",)),
    Case("eval-record-without-answer", _eval_data(json.dumps(_NO_ANSWER)), ("q-9",)),
]


# --- output directories of export / merge / import ------------------------------------------


def _out_user_dir(command: str) -> Callable[[Env], Call]:
    def setup(env: Env) -> Call:
        source = env.ckpt()
        return Call([command, str(source), "--out", str(env.user_dir())])

    return setup


def _out_overlapping(command: str, inside: str, *extra: str) -> Callable[[Env], Call]:
    def setup(env: Env) -> Call:
        source = env.ckpt()
        return Call([command, str(source), "--out", str(source / inside), *extra])

    return setup


def _import(source: Callable[[Env], Path]) -> Callable[[Env], Call]:
    def setup(env: Env) -> Call:
        return Call(["import", str(source(env)), "--out", str(env.out)], absent=(env.out,))

    return setup


def _llama_dir(env: Env) -> Path:
    path = env.tmp / "llama-dir"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32}))
    return path


def _out_file(env: Env) -> Call:
    return Call(["export", str(env.ckpt()), "--out", str(_a_file(env))])


EXPORT_CASES = [
    *(
        Case(f"{c}-out-user-dir", _out_user_dir(c), ("--overwrite", "mine"))
        for c in ("export", "merge", "import")
    ),
    Case("export-out-is-checkpoint", _out_overlapping("export", "."), ("overlaps the source",)),
    Case(
        "export-out-is-checkpoint-overwrite",
        _out_overlapping("export", ".", "--overwrite"),
        ("overlaps the source",),
    ),
    Case(
        "export-out-inside-checkpoint", _out_overlapping("export", "hf"), ("overlaps the source",)
    ),
    Case("merge-out-is-checkpoint", _out_overlapping("merge", "."), ("overlaps the source",)),
    Case("import-out-inside-source", _out_overlapping("import", "x"), ("overlaps the source",)),
    Case("export-out-is-a-file", _out_file, ("results.txt", "is a file")),
    Case(
        "import-vlm-adapters-checkpoint",
        _import(lambda env: env.ckpt()),
        ("not a transformers LLaVA checkpoint", "ckpt"),
    ),
    Case(
        "import-llama-checkpoint",
        _import(_llama_dir),
        ("not a transformers LLaVA checkpoint", "llama-dir"),
    ),
    Case("import-missing-source", _import(lambda env: env.tmp / "no-llava"), ("no-llava",)),
]


# --- command-line arguments (argparse) ------------------------------------------------------


def _argv(*argv: str) -> Callable[[Env], Call]:
    """Fixed arguments; ``{ckpt}`` and ``{cfg}`` become a copied checkpoint and config."""

    def setup(env: Env) -> Call:
        names = {"{ckpt}": lambda: str(env.ckpt()), "{cfg}": lambda: str(env.config())}
        return Call([names[a]() if a in names else a for a in argv])

    return setup


CLI_CASES = [
    Case("cli-unknown-subcommand", _argv("trian"), ("'trian'",)),
    Case("cli-no-subcommand", _argv(), ("COMMAND",)),
    Case("cli-unknown-option", _argv("list", "--colour"), ("--colour",)),
    Case("cli-train-missing-config", _argv("train"), ("config",)),
    Case("cli-train-bogus-stage", _argv("train", "--stage", "bogus", "{cfg}"), ("'bogus'",)),
    Case(
        "cli-train-bogus-stage-after-config",
        _argv("train", "{cfg}", "--stage", "bogus"),
        ("'bogus'",),
    ),
    Case("cli-train-unknown-flag", _argv("train", "{cfg}", "--frsh-connector"), ("--frsh",)),
    Case("cli-eval-missing-data", _argv("eval", "{ckpt}", "--images", "."), ("--data",)),
    Case(
        "cli-eval-batch-size-nan",
        _argv("eval", "x", "--data", "d", "--images", ".", "--batch-size", "many"),
        ("--batch-size",),
    ),
    Case("cli-generate-missing-prompt", _argv("generate", "{ckpt}"), ("--prompt",)),
    Case(
        "cli-generate-max-new-tokens-nan",
        _argv("generate", "{ckpt}", "--prompt", "hi", "--max-new-tokens", "notanumber"),
        ("--max-new-tokens", "notanumber"),
    ),
    Case(
        "cli-generate-temperature-nan",
        _argv("generate", "x", "--prompt", "p", "--temperature", "hot"),
        ("--temperature",),
    ),
    Case("cli-export-missing-out", _argv("export", "{ckpt}"), ("--out",)),
    Case(
        "cli-export-bad-format", _argv("export", "x", "--out", "y", "--format", "gguf"), ("gguf",)
    ),
    Case("cli-merge-missing-checkpoint-arg", _argv("merge", "--out", "y"), ("checkpoint",)),
    Case("cli-import-missing-out", _argv("import", "src"), ("--out",)),
]


CASES = [
    *CONFIG_CASES,
    *DATA_FILE_CASES,
    *SKIP_CASES,
    *ERROR_POLICY_CASES,
    *OUTPUT_CASES,
    *CHECKPOINT_CASES,
    *IMAGE_CASES,
    *EXPORT_CASES,
    *CLI_CASES,
]


def test_cases_are_many_and_uniquely_named() -> None:
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 65


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input(case: Case, run_case: Callable[[Case], None]) -> None:
    run_case(case)

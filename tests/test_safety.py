"""Safety: a checkpoint never runs code or unpickles, nothing the user owns is replaced, and
one run owns its directory."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from vlm_adapters import VisionLanguageModel, build_vlm
from vlm_adapters.cli import main
from vlm_adapters.errors import TrustError
from vlm_adapters.testing.tiny import tiny_model_config

SCRIPTS = Path(__file__).parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
from tiny_train import max_weight_diff, write_tiny_config  # noqa: E402


def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _checkpoint(tmp_path: Path, tokenizer_dir: str, vision: str = "hf") -> Path:
    directory = tmp_path / f"ckpt-{vision}"
    build_vlm(tiny_model_config(tokenizer_dir, vision=vision)).save_pretrained(directory)
    return directory


def _edit_config(checkpoint: Path, edit) -> None:  # noqa: ANN001
    path = checkpoint / "config.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _plant_code(directory: Path, marker: Path) -> None:
    """A module that, if anything ever imported it, would create ``marker``."""
    code = f"open({str(marker)!r}, 'w').close()\nclass Evil: pass\n"
    for folder in (directory, directory / "tokenizer"):
        (folder / "evil_code.py").write_text(code)


class _Pickle:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (open, (str(self.marker), "w"))


def _plant_pickle(path: Path, marker: Path) -> Path:
    """A pickle that creates ``marker`` when unpickled."""
    path.write_bytes(pickle.dumps({"state_dict": _Pickle(marker)}))
    return path


COMMANDS = [
    ["generate", "{ckpt}", "--prompt", "hi"],
    ["export", "{ckpt}", "--out", "{out}"],
    ["merge", "{ckpt}", "--out", "{out}"],
]


def _run(argv: list[str], ckpt: Path, out: Path, capsys: pytest.CaptureFixture) -> tuple[int, str]:
    code = main([a.format(ckpt=ckpt, out=out) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1
    return code, err


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda a: a[0])
def test_a_checkpoint_asking_for_remote_code_is_refused_and_its_code_never_runs(
    tmp_path, tokenizer_dir, capsys, argv
):
    ckpt, marker = _checkpoint(tmp_path, tokenizer_dir), tmp_path / "code-ran"
    _plant_code(ckpt, marker)

    def ask(data: dict) -> None:
        data["llm"]["trust_remote_code"] = True
        data["llm"]["config"]["auto_map"] = {"AutoModelForCausalLM": "evil_code.Evil"}

    _edit_config(ckpt, ask)
    before = _snapshot(tmp_path)
    code, err = _run(argv, ckpt, tmp_path / "out", capsys)
    assert code == 2 and "llm.trust_remote_code" in err and "--trust-remote-code" in err
    # the user's consent does not let an inline config name code either
    code, err = _run([*argv, "--trust-remote-code"], ckpt, tmp_path / "out", capsys)
    assert code == 2 and "auto_map" in err
    assert not marker.exists() and _snapshot(tmp_path) == before
    with pytest.raises(TrustError, match="trust_remote_code"):
        VisionLanguageModel.from_pretrained(ckpt)


def test_a_tokenizer_that_names_code_never_runs_it(tmp_path, tokenizer_dir, capsys):
    ckpt, marker = _checkpoint(tmp_path, tokenizer_dir), tmp_path / "code-ran"
    _plant_code(ckpt, marker)
    config = ckpt / "tokenizer" / "tokenizer_config.json"
    data = json.loads(config.read_text())
    config.write_text(json.dumps({**data, "auto_map": {"AutoTokenizer": ["evil_code.Evil", None]}}))
    main(["generate", str(ckpt), "--prompt", "red", "--max-new-tokens", "1"])
    assert "Traceback" not in capsys.readouterr().err
    assert not marker.exists()


@pytest.mark.parametrize(
    ("vision", "edit", "culprit"),
    [
        ("open_clip", lambda v, evil: v.update(pretrained=str(evil)), "vision.pretrained"),
        ("open_clip", lambda v, evil: v["model_kwargs"].update(weights_only=False), "weights_only"),
        ("open_clip", lambda v, evil: v.update(model=f"local-dir:{evil.parent}"), "local-dir"),
        ("timm", lambda v, evil: v["model_kwargs"].update(checkpoint_path=str(evil)), "checkpoint"),
        ("timm", lambda v, evil: v.update(pretrained=True), "vision.pretrained"),
        ("hf", lambda v, evil: v.update(model=str(evil.parent), config=None), "vision.model"),
    ],
    ids=["open_clip-file", "weights_only", "local-dir", "timm-checkpoint_path", "timm-hub", "hf"],
)
def test_a_checkpoint_naming_weights_outside_itself_is_refused_and_nothing_is_unpickled(
    tmp_path, tokenizer_dir, capsys, vision, edit, culprit
):
    ckpt, marker = _checkpoint(tmp_path, tokenizer_dir, vision), tmp_path / "unpickled"
    evil = _plant_pickle(ckpt / "weights.pt", marker)
    (ckpt / "open_clip_config.json").write_text(json.dumps({"model_cfg": {}}))
    _edit_config(ckpt, lambda data: edit(data["vision"], evil))
    before = _snapshot(tmp_path)
    for argv in COMMANDS:
        code, err = _run(argv, ckpt, tmp_path / "out", capsys)
        assert code == 2 and culprit in err, err
    assert not marker.exists() and _snapshot(tmp_path) == before


def test_export_never_replaces_a_user_directory_or_its_source(tmp_path, tokenizer_dir, capsys):
    ckpt = _checkpoint(tmp_path, tokenizer_dir)
    mine = tmp_path / "mine"
    (mine / "notes").mkdir(parents=True)
    (mine / "notes" / "todo.txt").write_text("keep me")
    (mine / "config.json").write_text("{}")
    before = _snapshot(tmp_path)
    assert main(["export", str(ckpt), "--out", str(mine)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    for target in (ckpt, ckpt / "export"):
        assert main(["export", str(ckpt), "--out", str(target), "--overwrite"]) == 2
        assert "overlaps the source" in capsys.readouterr().err
    assert _snapshot(tmp_path) == before

    assert main(["export", str(ckpt), "--out", str(mine), "--overwrite"]) == 0
    assert (mine / "notes" / "todo.txt").read_text() == "keep me"  # theirs kept
    assert json.loads((mine / "config.json").read_text())["model_type"] == "llava"
    assert oct((mine / "model.safetensors").stat().st_mode & 0o777) != "0o600"
    assert oct(mine.stat().st_mode & 0o777) == oct(0o777 & ~_umask())
    # exporting again replaces only our own files
    assert main(["export", str(ckpt), "--out", str(mine), "--overwrite"]) == 0
    assert (mine / "notes" / "todo.txt").read_text() == "keep me"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _wait_for(path: Path, process: subprocess.Popen, seconds: float = 600) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)


def test_a_second_run_on_the_same_out_is_refused_and_the_first_is_unharmed(tmp_path, capsys):
    config = write_tiny_config(tmp_path, num_train=32)
    script = [sys.executable, str(SCRIPTS / "tiny_train.py"), str(config)]
    args = ["stages.align.epochs=3", "stages.finetune.epochs=3"]
    out, reference = tmp_path / "out", tmp_path / "reference"
    first = subprocess.Popen([*script, str(out), *args], stdout=subprocess.DEVNULL)
    alone = subprocess.Popen([*script, str(reference), *args], stdout=subprocess.DEVNULL)
    _wait_for(out / "run.lock", first)
    assert (out / "run.lock").exists() and first.poll() is None, "the first run is not running"
    assert main(["train", str(config), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "in use by another run" in err and f"pid {first.pid}" in err
    assert first.wait() == 0 and alone.wait() == 0
    assert max_weight_diff(out / "finetune" / "final", reference / "finetune" / "final") == 0.0
    assert not (out / "run.lock").exists()


def test_a_dead_runs_lock_is_taken_over_with_a_warning(tmp_path, caplog):
    from vlm_adapters.training import train

    config = write_tiny_config(tmp_path, num_train=4)
    out = tmp_path / "out"
    out.mkdir()
    lock = {"pid": 999_999_999, "host": socket.gethostname(), "started": "then", "command": "x"}
    (out / "run.lock").write_text(json.dumps(lock))
    (out / ".vlm_adapters_files.json").write_text(json.dumps(["run.lock"]))
    train(config, "align", out)
    assert "taking over the lock of a run that is gone" in caplog.text
    assert (out / "align" / "final" / "model.safetensors").is_file()
    assert not (out / "run.lock").exists()


def test_a_lock_that_cannot_be_read_is_refused_not_taken_over(tmp_path, monkeypatch):
    from vlm_adapters.errors import OutputError
    from vlm_adapters.training.rundir import acquire_lock

    lock = tmp_path / "run.lock"
    lock.write_text(json.dumps({"pid": 999_999_999, "host": socket.gethostname()}))
    read_text = Path.read_text

    def denied(path: Path, *args, **kwargs) -> str:
        if path == lock:
            raise PermissionError(13, "Permission denied", str(path))
        return read_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", denied)  # as root, chmod 000 would not stop a read
    with pytest.raises(OutputError, match=r"run\.lock: cannot read .*PermissionError.*delete"):
        acquire_lock(tmp_path)
    monkeypatch.undo()
    assert json.loads(lock.read_text())["pid"] == 999_999_999  # still the other run's
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.lock"]


def test_resuming_with_a_changed_config_needs_consent(tmp_path, caplog):
    from vlm_adapters.errors import ConfigError
    from vlm_adapters.training import train

    config = write_tiny_config(tmp_path, num_train=8)
    out = tmp_path / "out"
    train(config, "align", out, overrides=["run.save_every=1"])
    changed = ["run.save_every=1", "stages.align.lr=0.5", "run.log_every=3"]
    with pytest.raises(ConfigError, match=r"stages\.align\.lr: 0\.01 -> 0\.5.*allow-config-change"):
        train(config, "align", out, resume="auto", overrides=changed)
    train(config, "align", out, resume="auto", overrides=changed, allow_config_change=True)
    assert "resuming with a changed config: stages.align.lr" in caplog.text


def test_resume_takes_another_attention_kernel_but_not_another_model(tmp_path):
    from vlm_adapters.errors import ConfigError
    from vlm_adapters.training.rundir import check_resume_config

    config = yaml.safe_load(write_tiny_config(tmp_path, num_train=8).read_text())
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    kernel = {**config, "llm": {**config["llm"], "attn_implementation": "sdpa"}}
    check_resume_config(out, kernel, allow_change=False)  # same weights, another kernel
    wider = {**config, "llm": {**config["llm"], "config": {**config["llm"]["config"]}}}
    wider["llm"]["config"]["hidden_size"] *= 2
    with pytest.raises(ConfigError, match=r"llm\.config\.hidden_size.*not the model's shape"):
        check_resume_config(out, wider, allow_change=True)


def test_a_key_added_since_a_run_started_is_not_a_change_but_a_new_value_is(tmp_path):
    from vlm_adapters.errors import ConfigError
    from vlm_adapters.training.config import train_config_from_dict
    from vlm_adapters.training.rundir import check_resume_config

    config = yaml.safe_load(write_tiny_config(tmp_path, num_train=8).read_text())
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.yaml").write_text(yaml.safe_dump(config))  # as an older release saved it
    resolved = train_config_from_dict(config).to_dict()
    assert "eval_task" not in config.get("data", {}) and resolved["data"]["eval_task"] == "loss"
    check_resume_config(out, resolved, allow_change=False)  # today's defaults: no change
    changed = {**resolved, "data": {**resolved["data"], "eval_task": "exact"}}
    with pytest.raises(ConfigError, match=r"data\.eval_task: 'loss' -> 'exact'"):
        check_resume_config(out, changed, allow_change=False)


@pytest.mark.parametrize("entry", ["config.yaml", "align"])
def test_overwrite_never_replaces_a_run_entry_the_user_made(tmp_path, entry):
    from vlm_adapters.errors import OutputError
    from vlm_adapters.training import train

    config = write_tiny_config(tmp_path / "tiny", num_train=8)
    out = tmp_path / "mine"
    out.mkdir()
    (out / entry).write_text("my notes\n")  # a file where the run writes config.yaml / align/
    with pytest.raises(OutputError, match=rf"{entry} exists and was not written by vlm-adapters"):
        train(config, "align", out, overwrite=True)
    assert (out / entry).read_text() == "my notes\n"
    assert sorted(p.name for p in out.iterdir()) == [entry]

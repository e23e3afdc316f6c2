"""`vlm-adapters smoke`: tiny data and a training config that trains any component in seconds."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from vlm_adapters import ComponentSpec
from vlm_adapters.cli import main
from vlm_adapters.connectors import Connector, ConnectorConfig
from vlm_adapters.errors import ConfigError
from vlm_adapters.testing import registered
from vlm_adapters.testing.smoke import smoke_section


class ScaledConfig(ConnectorConfig):
    scale: float = 1.0


class Scaled(Connector):
    """A plugin's connector, as seen by vlm-adapters: registered, default options."""

    def __init__(self, cfg: ScaledConfig, *, in_dim: int, out_dim: int, num_input_tokens: int):
        super().__init__(cfg, in_dim, out_dim, num_input_tokens)
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features) * self.cfg.scale


SCALED = ComponentSpec("connector", "smoke_scaled", Scaled, ScaledConfig, "test plugin")


def _smoke(capsys: pytest.CaptureFixture[str], out: Path, *args: str) -> list[str]:
    """Run `vlm-adapters smoke OUT ARGS`; the printed `vlm-adapters train ...` command."""
    assert main(["smoke", str(out), *args]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"wrote {out / 'smoke.yaml'} (data and tokenizer beside it)"
    command = shlex.split(printed[1].split(": ", 1)[1])
    assert command[:2] == ["vlm-adapters", "train"]
    return command[1:]


def _trained(out: Path) -> None:
    for stage in ("align", "finetune"):
        assert (out / "run" / stage / "final" / "model.safetensors").is_file()


def test_smoke_config_trains_with_the_builtins(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "smoke"
    command = _smoke(capsys, out)
    assert command == ["train", str(out / "smoke.yaml"), "--out", str(out / "run")]
    config = yaml.safe_load((out / "smoke.yaml").read_text())
    assert config["connector"] == {"type": "mlp"} and config["vision"]["type"] == "hf"
    assert config["llm"]["tokenizer"] == str(out / "tokenizer")
    assert (out / "data" / "align.json").is_file() and (out / "tokenizer").is_dir()
    assert main(command) == 0
    _trained(out)


def test_smoke_config_trains_with_a_plugin_component(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "smoke"
    with registered(SCALED, provider="vlm-adapters-scaled"):
        command = _smoke(capsys, out, "--connector", "smoke_scaled", "connector.scale=0.5")
        config = yaml.safe_load((out / "smoke.yaml").read_text())
        assert config["connector"] == {"type": "smoke_scaled", "scale": 0.5}
        assert main(command) == 0
    _trained(out)


def test_smoke_train_flag_runs_it_with_tiny_variants(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "smoke"
    args = ["smoke", str(out), "--vision", "hf_siglip", "--connector", "pool", "--llm", "qwen2"]
    assert main([*args, "--train"]) == 0
    assert "training: vlm-adapters train " in capsys.readouterr().out
    config = yaml.safe_load((out / "smoke.yaml").read_text())
    assert config["vision"]["config"]["model_type"] == "siglip_vision_model"
    assert config["llm"]["config"]["model_type"] == "qwen2"
    _trained(out)


def test_smoke_sections_for_builtins_and_plugins(tmp_path: Path) -> None:
    assert smoke_section("connector", "pool", "tok") == {"type": "pool", "factor": 2}
    assert smoke_section("llm", "hf", "tok")["config"]["model_type"] == "llama"
    plugin = ComponentSpec("connector", "linear_x", Scaled, ScaledConfig, "x")
    with registered(plugin):
        assert smoke_section("connector", "linear_x", "tok") == {"type": "linear_x"}
    llm = ComponentSpec("llm", "my_llm", Scaled, ScaledConfig, "x")
    with registered(llm, provider="vlm-adapters-my-llm"):
        assert smoke_section("llm", "my_llm", "tok") == {"type": "my_llm", "tokenizer": "tok"}
    with pytest.raises(
        ConfigError, match=r"--llm 'my_llm': no such llm type; .*tiny variants: llama"
    ):
        smoke_section("llm", "my_llm", "tok")


def test_smoke_refuses_bad_requests_before_writing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "smoke"
    assert main(["smoke", str(out), "--connector", "mpl"]) == 2
    err = capsys.readouterr().err
    assert "--connector 'mpl': no such connector type (did you mean 'mlp'?); types: " in err
    assert not out.exists()
    assert main(["smoke", str(out), "connector.depth=0"]) == 2
    assert "connector.depth: Input should be greater than or equal to 1" in capsys.readouterr().err
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert main(["smoke", str(mine)]) == 2
    assert "is not empty and was not written by vlm-adapters" in capsys.readouterr().err

"""Entry-point plugins, faked as installed distributions in a temp dir on sys.path."""

from __future__ import annotations

import importlib.metadata
import json
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import vlm_adapters
from vlm_adapters import ComponentSpec, plugins
from vlm_adapters.cli import main
from vlm_adapters.config import ConfigError, parse_section
from vlm_adapters.plugins import PluginLoadWarning, get_registry
from vlm_adapters.registry import ComponentError
from vlm_adapters.testing import tiny_model_config

PLUGIN_SOURCE = """
import torch
from torch import nn

import vlm_adapters
from vlm_adapters.connectors import Connector, ConnectorConfig
from vlm_adapters.registry import ComponentSpec


class DoubleConfig(ConnectorConfig):
    scale: float = 2.0


class DoubleConnector(Connector):
    def __init__(self, cfg, *, in_dim, out_dim, num_input_tokens):
        super().__init__(cfg, in_dim, out_dim, num_input_tokens)
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, features):
        return self.proj(features) * self.cfg.scale


@vlm_adapters.hookimpl
def register_connectors():
    return [ComponentSpec("connector", "{name}", DoubleConnector, DoubleConfig, "Test double.")]
"""

Install = Callable[..., str]


@pytest.fixture
def install_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Install]:
    """Fake ``pip install`` of a plugin package; undone (and the registry reset) afterwards."""
    modules: list[str] = []
    monkeypatch.syspath_prepend(str(tmp_path))

    def install(
        package: str,
        connector: str = "double",
        source: str | None = None,
        requires: tuple[str, ...] = (),
    ) -> str:
        module = f"{package}_plugin"
        code = PLUGIN_SOURCE.replace("{name}", connector) if source is None else source
        (tmp_path / f"{module}.py").write_text(code)
        info = tmp_path / f"{package}-0.1.dist-info"
        info.mkdir()
        needs = "".join(f"Requires-Dist: {r}\n" for r in requires)
        metadata = f"Metadata-Version: 2.1\nName: {package}\nVersion: 0.1\n{needs}"
        (info / "METADATA").write_text(metadata)
        (info / "entry_points.txt").write_text(f"[vlm_adapters]\n{package} = {module}\n")
        modules.append(module)
        plugins.reset()
        return module

    yield install
    for module in modules:
        sys.modules.pop(module, None)
    plugins.reset()


def _row(name: str) -> dict[str, str] | None:
    return next((r for r in vlm_adapters.list_components("connector") if r["name"] == name), None)


def test_installed_plugin_is_listed_with_its_package(install_plugin: Install) -> None:
    assert _row("double") is None
    install_plugin("fakeplug")
    assert _row("double") == {
        "kind": "connector",
        "name": "double",
        "provider": "fakeplug",
        "description": "Test double.",
    }


def test_plugin_component_is_usable_from_yaml(
    install_plugin: Install, tokenizer_dir: str, tmp_path: Path
) -> None:
    install_plugin("fakeplug")
    config = tiny_model_config(tokenizer_dir)
    config["connector"] = {"type": "double", "scale": 3.0}
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(config))
    assert vlm_adapters.load_config(str(path)).connector.params.scale == 3.0
    model = vlm_adapters.build_vlm(str(path))
    assert type(model.connector).__name__ == "DoubleConnector"
    features = torch.randn(1, 16, model.vision.hidden_size)
    plain = model.connector.proj(features)
    torch.testing.assert_close(model.connector(features), 3.0 * plain)
    model.save_pretrained(tmp_path / "ckpt")
    assert model.checkpoint_config()["providers"]["connector"] == "fakeplug"
    loaded = vlm_adapters.VisionLanguageModel.from_pretrained(tmp_path / "ckpt")
    assert loaded.connector.cfg.scale == 3.0


def test_duplicate_name_names_both_providers(install_plugin: Install) -> None:
    install_plugin("fakeplug", connector="mlp")
    with pytest.raises(ComponentError, match="'vlm-adapters' and 'fakeplug'"):
        vlm_adapters.list_components()


def test_unknown_name_lists_names_and_closest_match() -> None:
    with pytest.raises(ComponentError, match="did you mean 'resampler'") as info:
        get_registry().get("connector", "resampeler")
    available = str(info.value).split("available: ")[1].split(", ")
    assert {"linear", "mlp", "pool", "qformer", "resampler"} <= set(available)
    assert available == sorted(available)
    with pytest.raises(ComponentError, match="unknown llm component 'xyz'; available: .*hf"):
        get_registry().get("llm", "xyz")


def test_broken_plugin_warns_and_others_still_load(install_plugin: Install) -> None:
    install_plugin("fakeplug")
    install_plugin("brokenplug", source="raise ImportError('needs libfoo')\n")
    with pytest.warns(
        PluginLoadWarning,
        match=r"'brokenplug' 0.1 \(failed\): loading it raised ImportError: needs libfoo",
    ):
        rows = vlm_adapters.list_components()
    names = {(r["kind"], r["name"]) for r in rows}
    assert {("connector", "double"), ("connector", "mlp"), ("vision", "hf")} <= names


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "yes", "Yes"])
def test_disable_env_skips_entry_points(
    install_plugin: Install, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    install_plugin("fakeplug")
    monkeypatch.setenv(plugins.DISABLE_ENV, value)
    plugins.reset()
    assert _row("double") is None
    assert _row("mlp") is not None
    with pytest.raises(ConfigError, match="connector.type: unknown connector component 'double'"):
        parse_section("connector", {"type": "double"})
    status = plugins.plugin_status("fakeplug")
    assert status is not None and status.status == "disabled"
    assert status.reason == "VLM_ADAPTERS_DISABLE_PLUGINS is set"


@pytest.mark.parametrize("value", ["0", "false", "No", "", " "])
def test_disable_env_off_values_load_plugins(
    install_plugin: Install, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    install_plugin("fakeplug")
    monkeypatch.setenv(plugins.DISABLE_ENV, value)
    plugins.reset()
    assert _row("double") is not None


def test_disable_env_rejects_other_values(
    install_plugin: Install, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(plugins.DISABLE_ENV, "please")
    plugins.reset()
    with pytest.raises(ConfigError, match="VLM_ADAPTERS_DISABLE_PLUGINS='please': use 1/true/yes"):
        get_registry()


# ------------------------------------------------------------ compatibility (Requires-Dist)


def test_incompatible_plugin_is_reported_and_skipped(install_plugin: Install) -> None:
    install_plugin("fakeplug", requires=("vlm-adapters>=0.1", "torch"))
    module = install_plugin("oldplug", connector="old", requires=("vlm-adapters<0.1",))
    installed = importlib.metadata.version("vlm-adapters")
    expected = (
        rf"'oldplug' 0.1 \(incompatible\): it requires vlm-adapters<0.1 but vlm-adapters "
        rf"{installed} is installed"
    )
    with pytest.warns(PluginLoadWarning, match=expected):
        names = [r["name"] for r in vlm_adapters.list_components("connector")]
    assert "double" in names and "old" not in names
    assert module not in sys.modules  # not even imported
    status = plugins.plugin_status("oldplug")
    assert (status.version, status.status) == ("0.1", "incompatible")
    assert plugins.plugin_status("fakeplug").status == "loaded"


@pytest.mark.parametrize(
    ("requires", "installed", "problem"),
    [
        ((), "0.1.0", ""),
        (("vlm-adapters",), "0.1.0", ""),
        (("vlm_adapters>=0.1,<0.2",), "0.1.3", ""),
        (("VLM.Adapters<0.2",), "0.2.0", "it requires vlm-adapters<0.2 but vlm-adapters 0.2.0"),
        (("vlm-adapters>=0.1",), "0.2.0rc1", ""),  # a pre-release inside the range is fine
        (("vlm-adapters[dev]>=0.3",), "0.2.0", "it requires vlm-adapters>=0.3"),
        (('vlm-adapters<0.1; extra == "test"',), "0.1.0", ""),  # only for an extra
        (('vlm-adapters<0.1; python_version < "3"',), "0.1.0", ""),
    ],
)
def test_incompatibility_reads_the_vlm_adapters_range(
    install_plugin: Install, requires: tuple[str, ...], installed: str, problem: str
) -> None:
    install_plugin("rangeplug", requires=requires)
    dist = importlib.metadata.distribution("rangeplug")
    found = plugins.incompatibility(dist, installed)
    assert found.startswith(problem) if problem else found == ""


# ------------------------------------------------- each register_* hook, called and guarded

HOOK_SOURCE = """
import vlm_adapters
from vlm_adapters import ComponentConfig, ComponentSpec


@vlm_adapters.hookimpl
def {hook}():
    {body}
"""
KINDS = {
    "register_vision_backbones": "vision",
    "register_connectors": "connector",
    "register_llm_backends": "llm",
}


def _hook_source(*hooks: tuple[str, str]) -> str:
    """A plugin module implementing each ``(hook, body)``."""
    return "".join(HOOK_SOURCE.format(hook=hook, body=body) for hook, body in hooks)


def _returns(kind: str, name: str) -> str:
    return f"return [ComponentSpec({kind!r}, {name!r}, object, ComponentConfig, 'test')]"


def _check_hook_is_called_and_guarded(install_plugin: Install, hook: str) -> None:
    """A plugin implementing ``hook`` registers through it; another whose ``hook`` raises when
    called (it imports fine) is reported by package and contributes nothing, not even what its
    other, working hook returns."""
    kind = KINDS[hook]
    other = next(h for h in KINDS if h != hook)
    install_plugin("goodplug", source=_hook_source((hook, _returns(kind, "good_one"))))
    bad = _hook_source((other, _returns(KINDS[other], "bad_other")),
                       (hook, "raise RuntimeError('boom')"))  # fmt: skip
    install_plugin("badplug", source=bad)
    expected = rf"'badplug' 0.1 \(failed\): hook {hook}\(\) raised RuntimeError: boom; skipped"
    with pytest.warns(PluginLoadWarning, match=expected):
        rows = {(r["kind"], r["name"]): r["provider"] for r in vlm_adapters.list_components()}
    assert rows[(kind, "good_one")] == "goodplug"
    assert (KINDS[other], "bad_other") not in rows
    assert rows[("connector", "mlp")] == "vlm-adapters"
    status = plugins.plugin_status("badplug")
    assert (status.status, status.components) == ("failed", [])
    assert plugins.plugin_status("goodplug").components == [f"{kind}:good_one"]


def test_register_vision_backbones_is_called_and_a_raising_one_skipped(
    install_plugin: Install,
) -> None:
    _check_hook_is_called_and_guarded(install_plugin, "register_vision_backbones")


def test_register_connectors_is_called_and_a_raising_one_skipped(install_plugin: Install) -> None:
    _check_hook_is_called_and_guarded(install_plugin, "register_connectors")


def test_register_llm_backends_is_called_and_a_raising_one_skipped(
    install_plugin: Install,
) -> None:
    _check_hook_is_called_and_guarded(install_plugin, "register_llm_backends")


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ("return ['mlp']", "returned a str, not a ComponentSpec"),
        (
            _returns("vision", "misfiled"),
            "returned 'misfiled' of kind 'vision'; it takes 'connector'",
        ),
    ],
)
def test_a_hook_returning_something_else_is_skipped(
    install_plugin: Install, body: str, match: str
) -> None:
    install_plugin("oddplug", source=_hook_source(("register_connectors", body)))
    with pytest.warns(PluginLoadWarning, match=f"'oddplug' .*{match}"):
        names = [r["name"] for r in vlm_adapters.list_components()]
    assert "misfiled" not in names and "mlp" in names


def test_a_raising_builtin_hook_is_a_bug_not_a_warning() -> None:
    class Broken:
        @vlm_adapters.hookimpl
        def register_connectors(self) -> list[ComponentSpec]:
            raise RuntimeError("our bug")

    pm = plugins.new_plugin_manager(load_entry_points=False)
    plugins.register(pm, Broken(), plugins.BUILTIN_PROVIDER)
    with pytest.raises(RuntimeError, match="our bug"):
        plugins.collect_registry(pm)


# --------------------------------------------------------- `vlm-adapters list`: plugin status


def _install_one_of_each(install_plugin: Install) -> None:
    install_plugin("fakeplug")
    install_plugin("brokenplug", source="raise ImportError('needs libfoo')\n")
    install_plugin("oldplug", connector="old", requires=("vlm-adapters>=99",))
    raising = _hook_source(("register_connectors", "raise KeyError('nope')"))
    install_plugin("raisingplug", source=raising)


def test_list_shows_every_plugin_package_version_and_status(
    install_plugin: Install, capsys: pytest.CaptureFixture[str]
) -> None:
    _install_one_of_each(install_plugin)
    with pytest.warns(PluginLoadWarning):
        assert main(["list", "--plugins", "--json"]) == 0
    rows = {r["package"]: r for r in json.loads(capsys.readouterr().out)}
    assert {p: (r["version"], r["status"]) for p, r in rows.items() if p.endswith("plug")} == {
        "fakeplug": ("0.1", "loaded"),
        "brokenplug": ("0.1", "failed"),
        "oldplug": ("0.1", "incompatible"),
        "raisingplug": ("0.1", "failed"),
    }
    assert rows["fakeplug"]["components"] == ["connector:double"]
    assert rows["fakeplug"]["entry_points"] == ["fakeplug"]
    assert "ImportError: needs libfoo" in rows["brokenplug"]["reason"]
    assert "requires vlm-adapters>=99" in rows["oldplug"]["reason"]
    assert "register_connectors() raised KeyError" in rows["raisingplug"]["reason"]
    assert list(rows)[0] == "vlm-adapters" and rows["vlm-adapters"]["status"] == "loaded"
    assert main(["list"]) == 0  # the text view: components, then the plugin packages
    out = capsys.readouterr().out
    table = out.split("plugin packages:\n")[1].splitlines()
    status = {line.split()[0]: line.split()[1:3] for line in table}
    assert status["oldplug"] == ["0.1", "incompatible"]
    assert status["brokenplug"] == ["0.1", "failed"] and status["fakeplug"] == ["0.1", "loaded"]
    assert any(line.split()[:3] == ["connector", "double", "fakeplug"] for line in out.splitlines())


def test_list_shows_disabled_plugins(
    install_plugin: Install, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _install_one_of_each(install_plugin)
    monkeypatch.setenv(plugins.DISABLE_ENV, "yes")
    plugins.reset()
    assert main(["list", "--plugins"]) == 0
    lines = capsys.readouterr().out.splitlines()
    status = {line.split()[0]: line.split()[2] for line in lines}
    assert {status[p] for p in ("fakeplug", "brokenplug", "oldplug", "raisingplug")} == {"disabled"}
    assert status["vlm-adapters"] == "loaded"


# ------------------------------------------------ loading a checkpoint whose plugins are missing


def _checkpoint(directory: Path, sections: dict[str, tuple[str, str]]) -> Path:
    """A checkpoint's config.json: ``kind -> (type, provider)``; missing components are found
    before anything else is read."""
    directory.mkdir()
    config: dict[str, Any] = {"format": "vlm-adapters", "providers": {}}
    for kind, (name, provider) in sections.items():
        config[kind] = {"type": name}
        config["providers"][kind] = provider
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def _load_error(path: Path) -> str:
    with pytest.raises(ComponentError) as info:
        vlm_adapters.VisionLanguageModel.from_pretrained(path)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_a_checkpoint_names_every_missing_plugin_in_one_message(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path / "ckpt", {
        "vision": ("ghost_vision", "vlm-adapters-ghost-vision"),
        "connector": ("ghost", "vlm-adapters-ghost"),
        "llm": ("hf", "vlm-adapters"),
    })  # fmt: skip
    message = _load_error(path)
    assert message.startswith("this checkpoint needs 2 components: the vision component ")
    assert "'ghost_vision', which its config.json says comes from the package " in message
    assert "the connector component 'ghost'" in message
    assert message.endswith(
        "if you trust them, run `pip install vlm-adapters-ghost-vision vlm-adapters-ghost`"
    )


def test_a_checkpoint_with_one_missing_plugin_keeps_its_wording(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path / "ckpt", {
        "vision": ("hf", "vlm-adapters"),
        "connector": ("ghost", "vlm-adapters-ghost"),
        "llm": ("hf", "vlm-adapters"),
    })  # fmt: skip
    assert _load_error(path) == (
        "this checkpoint needs the connector component 'ghost', which its config.json says "
        "comes from the package 'vlm-adapters-ghost'; it is not installed: if you trust it, "
        "run `pip install vlm-adapters-ghost`"
    )
    path = _checkpoint(tmp_path / "newer", {
        "vision": ("hf", "vlm-adapters"),
        "connector": ("future", "vlm-adapters"),
        "llm": ("hf", "vlm-adapters"),
    })  # fmt: skip
    assert _load_error(path) == (
        "this checkpoint needs the connector component 'future', which this version of "
        "vlm-adapters does not have; it may come from a newer version"
    )


@pytest.mark.parametrize(
    ("setup", "says"),
    [
        ("disabled", "it is installed but disabled (VLM_ADAPTERS_DISABLE_PLUGINS)"),
        ("broken", "it is installed but failed to load: loading it raised ImportError: no libfoo"),
        ("raising", "it is installed but failed to load: hook register_connectors() raised"),
        ("old", "it is installed but incompatible: it requires vlm-adapters>=99 but"),
        ("renamed", "it is installed (version 0.1) but does not provide it"),
    ],
)
def test_a_checkpoint_says_why_an_installed_plugin_is_missing(
    install_plugin: Install,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    setup: str,
    says: str,
) -> None:
    sources = {
        "broken": "raise ImportError('no libfoo')\n",
        "raising": _hook_source(("register_connectors", "raise ValueError('x')")),
    }
    install_plugin(
        "fakeplug",
        connector="renamed" if setup == "renamed" else "double",
        source=sources.get(setup),
        requires=("vlm-adapters>=99",) if setup == "old" else (),
    )
    if setup == "disabled":
        monkeypatch.setenv(plugins.DISABLE_ENV, "1")
    path = _checkpoint(tmp_path / "ckpt", {
        "vision": ("ghost_vision", "vlm-adapters-ghost-vision"),
        "connector": ("double", "fakeplug"),
        "llm": ("hf", "vlm-adapters"),
    })  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PluginLoadWarning)
        message = _load_error(path)
    source = "which its config.json says comes from the package 'fakeplug'"
    assert f"the connector component 'double', {source}; {says}" in message
    assert "'ghost_vision'" in message
    assert message.endswith("if you trust it, run `pip install vlm-adapters-ghost-vision`")
    assert "pip install fakeplug" not in message

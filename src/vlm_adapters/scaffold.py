"""``new_plugin``: write a ready-to-install plugin package with a working stub component."""

from __future__ import annotations

import re
from pathlib import Path
from string import Template

from vlm_adapters._io import atomic_dir
from vlm_adapters.plugins import get_registry

KINDS = ("connector", "vision", "llm")
_NAME = re.compile(r"^[a-z][a-z0-9_-]*[a-z0-9]$")

_PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "$dist"
version = "0.1.0"
description = "The $name $kind for vlm-adapters."
readme = "README.md"
requires-python = ">=3.10"
dependencies = ["vlm-adapters>=0.1"]

[project.optional-dependencies]
test = ["pytest>=8"]

# vlm-adapters discovers plugins through this entry-point group
[project.entry-points.vlm_adapters]
$name = "$module.plugin"

[tool.setuptools.packages.find]
where = ["src"]

[tool.pytest.ini_options]
testpaths = ["tests"]
"""

_README = """\
# $dist

The `$name` $kind for [vlm-adapters](https://github.com/vlm-adapters/vlm-adapters).

```bash
pip install -e .                   # register the plugin
vlm-adapters list --kind $kind    # shows $name, provided by $dist
pytest                             # conformance checks + a whole model built with it
```

Use it in a model config:

```yaml
$section:
  type: $name
$example```
"""

_INIT = '''\
"""The $name $kind for vlm-adapters."""

from .component import $cls, ${cls}Config

__all__ = ["$cls", "${cls}Config"]
'''

_PLUGIN = '''\
"""The module named by the ``vlm_adapters`` entry point: registers the component."""

from __future__ import annotations

import vlm_adapters

from .component import $cls, ${cls}Config


@vlm_adapters.hookimpl
def $hook() -> list[vlm_adapters.ComponentSpec]:
    return [
        vlm_adapters.ComponentSpec(
            kind="$kind",
            name="$name",
            factory=$cls,
            config=${cls}Config,
            description="$description",
        )
    ]
'''

_COMPONENTS = {
    "connector": '''\
"""The $name connector: ``[B, N, in_dim] -> [B, N, out_dim]`` (replace with your design)."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from vlm_adapters.connectors import Connector, ConnectorConfig


class ${cls}Config(ConnectorConfig):
    """Options of the ``$name`` connector (validated before anything is built)."""

    depth: int = Field(2, ge=1, description="Number of linear layers.")

    # override num_output_tokens(num_input_tokens) if the connector changes the token count


class $cls(Connector):
    """Linear layers with GELU between them, applied to every patch token."""

    def __init__(
        self, cfg: ${cls}Config, *, in_dim: int, out_dim: int, num_input_tokens: int
    ) -> None:
        super().__init__(cfg, in_dim, out_dim, num_input_tokens)
        layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
        for _ in range(cfg.depth - 1):
            layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
        self.proj = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features)  # [B, N, out_dim]
''',
    "vision": '''\
"""The $name vision backbone: a patch embedding (replace with your encoder)."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from vlm_adapters import ComponentConfig
from vlm_adapters.vision import ImageTransform, VisionBackbone


class ${cls}Config(ComponentConfig):
    """Options of the ``$name`` vision backbone (validated before anything is built)."""

    image_size: int = Field(32, ge=8, description="Input resolution in pixels.")
    patch_size: int = Field(8, ge=1, description="Side of a square patch; divides image_size.")
    hidden_size: int = Field(32, ge=1, description="Feature width D.")


class $cls(VisionBackbone):
    """``[B, 3, S, S] -> [B, (S / patch)**2, hidden_size]``."""

    def __init__(self, cfg: ${cls}Config) -> None:
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(
                f"$name: patch_size {cfg.patch_size} must divide image_size {cfg.image_size}"
            )
        self.cfg = cfg
        self.hidden_size = cfg.hidden_size
        self.num_patches = (cfg.image_size // cfg.patch_size) ** 2
        self.transform = ImageTransform(crop_size=cfg.image_size)
        self.patch = nn.Conv2d(3, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.norm = nn.LayerNorm(cfg.hidden_size)

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        grid = self.patch(pixel_values.to(self.dtype))  # [B, D, S/p, S/p]
        return self.norm(grid.flatten(2).transpose(1, 2))  # [B, N, D]
''',
    "llm": '''\
"""The $name LLM backend: a small random Llama (replace with your model loading)."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from vlm_adapters import ComponentConfig
from vlm_adapters.llm import LLMBackend


class ${cls}Config(ComponentConfig):
    """Options of the ``$name`` LLM backend (validated before anything is built)."""

    tokenizer: str = Field(description="Tokenizer hub id or directory.")
    hidden_size: int = Field(32, ge=8, description="Model width.")
    num_layers: int = Field(2, ge=1, description="Decoder layers.")
    num_heads: int = Field(4, ge=1, description="Attention heads; divides hidden_size.")
    image_token: str = Field("<image>", description="Placeholder token added to the tokenizer.")


class $cls(LLMBackend):
    """A Llama-architecture causal LM with the image (and a pad) token added."""

    def __init__(self, cfg: ${cls}Config) -> None:
        super().__init__()
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        self.cfg = cfg
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer)
        self.tokenizer.add_tokens([cfg.image_token], special_tokens=True)
        if self.tokenizer.pad_token is None:
            self.tokenizer.add_special_tokens({"pad_token": "<pad>"})
        config = LlamaConfig(
            vocab_size=len(self.tokenizer),
            hidden_size=cfg.hidden_size,
            intermediate_size=2 * cfg.hidden_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            max_position_embeddings=512,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        self.model = LlamaForCausalLM(config)
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(cfg.image_token)

    def rebuild_kwargs(self) -> dict[str, Any]:
        """Everything but the tokenizer, which checkpoints store next to the weights."""
        return self.cfg.model_dump(exclude={"tokenizer"})
''',
}

_TESTS = {
    "connector": ("connector", 'vlm_check_connector("$name")', "connector"),
    "vision": ("vision_backbone", 'vlm_check_vision_backbone("$name")', "vision"),
    "llm": (
        "llm_backend",
        'vlm_check_llm_backend("$name", {"tokenizer": vlm_tiny_tokenizer})',
        "llm",
    ),
}

_TEST = '''\
"""Conformance checks and a whole model built with the $name $kind."""

from __future__ import annotations

import vlm_adapters


def test_listed_with_this_package_as_provider() -> None:
    rows = {r["name"]: r for r in vlm_adapters.list_components("$kind")}
    assert rows["$name"]["provider"] == "$dist"


def test_conformance(vlm_check_$fixture$tok_arg) -> None:
    $check


def test_in_a_model(vlm_tiny_model_config, vlm_check_vlm$tok_arg) -> None:
    config = vlm_tiny_model_config($section={"type": "$name"$section_extra})
    model = vlm_check_vlm(config)  # build_vlm, forward, backward, save/load round trip
    assert type(model.$section).__name__ == "$cls"
'''

_DESCRIPTIONS = {
    "connector": "Linear layers with GELU per patch token (scaffold stub).",
    "vision": "Patch embedding with LayerNorm (scaffold stub).",
    "llm": "A small random Llama with the image token added (scaffold stub).",
}
_EXAMPLES = {"connector": "  depth: 2\n", "vision": "  image_size: 32\n", "llm": ""}
_HOOKS = {
    "connector": "register_connectors",
    "vision": "register_vision_backbones",
    "llm": "register_llm_backends",
}


def new_plugin(name: str, kind: str, out: str | Path = ".") -> Path:
    """Write the package ``vlm-adapters-NAME`` into ``out``; return its directory."""
    values = _values(name, kind)
    target = Path(out) / values["dist"]
    if target.exists():
        raise ValueError(f"{target} already exists; choose another --out or remove it")
    files = {
        "pyproject.toml": _PYPROJECT,
        "README.md": _README,
        f"src/{values['module']}/__init__.py": _INIT,
        f"src/{values['module']}/plugin.py": _PLUGIN,
        f"src/{values['module']}/component.py": _COMPONENTS[kind],
        f"tests/test_{values['component']}.py": _TEST,
    }
    with atomic_dir(target) as tmp:
        for rel, text in files.items():
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(Template(text).substitute(values))
    return target


def _values(name: str, kind: str) -> dict[str, str]:
    """Template values; rejects bad names and names already registered."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; use one of {', '.join(KINDS)}")
    if not _NAME.match(name):
        raise ValueError(
            f"plugin name {name!r}: use lower-case letters, digits, '-' or '_', "
            "starting with a letter (e.g. my-connector)"
        )
    component = name.replace("-", "_")
    if component in get_registry().names(kind):
        provider = get_registry().get(kind, component).provider
        raise ValueError(f"a {kind} named {component!r} already exists (from {provider})")
    fixture, check, section = _TESTS[kind]
    llm = kind == "llm"
    return {
        "name": component,
        "kind": kind,
        "dist": f"vlm-adapters-{component.replace('_', '-')}",
        "module": f"vlm_adapters_{component}",
        "component": component,
        "cls": "".join(part.capitalize() for part in component.split("_")),
        "hook": _HOOKS[kind],
        "description": _DESCRIPTIONS[kind],
        "example": _EXAMPLES[kind],
        "fixture": fixture,
        "check": Template(check).substitute(name=component),
        "section": section,
        "tok_arg": ", vlm_tiny_tokenizer" if llm else "",
        "section_extra": ', "tokenizer": vlm_tiny_tokenizer' if llm else "",
    }

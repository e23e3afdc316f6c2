"""Build components from ``{type: name, **kwargs}`` sections through the registry."""

from __future__ import annotations

from typing import Any

from vlm_adapters.config import Section, parse_section
from vlm_adapters.connectors import Connector
from vlm_adapters.llm import LLMBackend
from vlm_adapters.plugins import get_registry
from vlm_adapters.vision import VisionBackbone


def _section(kind: str, section: Section | dict[str, Any]) -> Section:
    return section if isinstance(section, Section) else parse_section(kind, section)


def build_vision(section: Section | dict[str, Any]) -> VisionBackbone:
    """A vision backbone from its config section."""
    section = _section("vision", section)
    return get_registry().get("vision", section.type).factory(section.params)


def build_llm(section: Section | dict[str, Any]) -> LLMBackend:
    """An LLM backend from its config section."""
    section = _section("llm", section)
    return get_registry().get("llm", section.type).factory(section.params)


def build_connector(
    section: Section | dict[str, Any], *, in_dim: int, out_dim: int, num_input_tokens: int
) -> Connector:
    """A connector from its config section, sized between the vision and LLM widths."""
    section = _section("connector", section)
    factory = get_registry().get("connector", section.type).factory
    return factory(
        section.params, in_dim=in_dim, out_dim=out_dim, num_input_tokens=num_input_tokens
    )

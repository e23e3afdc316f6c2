"""Every hook a vlm-adapters plugin can implement.

A plugin is any module or object with functions decorated by :data:`vlm_adapters.hookimpl`.
Built-in components are provided by plugins that use exactly these hooks; third-party
packages announce theirs through the ``vlm_adapters`` entry-point group.

Each ``register_*`` hook is called once, when the registry is first built. A third-party
plugin whose hook raises, or returns anything but specs of the hook's kind, is skipped with a
:class:`vlm_adapters.plugins.PluginLoadWarning` naming its package (and ``vlm-adapters list``
shows it as ``failed``); the other plugins still register.
"""

from __future__ import annotations

import pluggy

from vlm_adapters.registry import ComponentSpec

PROJECT = "vlm_adapters"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_vision_backbones() -> list[ComponentSpec]:
    """Return the vision backbones this plugin provides.

    Each :class:`ComponentSpec` has ``kind="vision"``; its factory returns a
    :class:`vlm_adapters.vision.VisionBackbone`.
    """


@hookspec
def register_connectors() -> list[ComponentSpec]:
    """Return the connectors this plugin provides.

    Each :class:`ComponentSpec` has ``kind="connector"``; its factory is called with
    ``(config, in_dim=..., out_dim=..., num_input_tokens=...)`` and returns a
    :class:`vlm_adapters.connectors.Connector`.
    """


@hookspec
def register_llm_backends() -> list[ComponentSpec]:
    """Return the LLM backends this plugin provides.

    Each :class:`ComponentSpec` has ``kind="llm"``; its factory returns a
    :class:`vlm_adapters.llm.LLMBackend`.
    """

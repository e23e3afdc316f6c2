"""Boolean environment switches, read the same way everywhere."""

from __future__ import annotations

import os

TRUE = ("1", "true", "yes", "on")
FALSE = ("", "0", "false", "no", "off")


def env_flag(name: str) -> bool:
    """True for ``1/true/yes/on`` (any case); ``0/false/no/off``, empty or unset are False.

    Any other value is an error naming the variable, rather than a silent guess.
    """
    value = os.environ.get(name, "").strip().lower()
    if value in TRUE:
        return True
    if value in FALSE:
        return False
    from vlm_adapters.errors import ConfigError

    raise ConfigError(f"{name}={value!r}: use 1/true/yes to switch it on, 0/false/no or unset")

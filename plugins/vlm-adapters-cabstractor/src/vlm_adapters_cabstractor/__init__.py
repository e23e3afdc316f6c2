"""C-Abstractor connector for vlm-adapters (Honeybee, Cha et al., CVPR 2024)."""

from .connector import CAbstractor, CAbstractorConfig

__all__ = ["CAbstractor", "CAbstractorConfig"]

"""One error hierarchy: every failure the user can fix is a :class:`VLMError` with a one-line
message naming the file, sample or key at fault and what to do about it."""

from __future__ import annotations


class VLMError(Exception):
    """Base class of every error vlm-adapters raises for bad input."""


class ConfigError(VLMError, ValueError):
    """A config problem, reported before any model is built."""


class ComponentError(VLMError, LookupError):
    """An unknown, duplicated or unloadable component."""


class DataError(VLMError, ValueError):
    """A sample, file or conversation that cannot be used; the message says how to fix it."""


class CheckpointError(VLMError, ValueError):
    """A checkpoint that is missing, incomplete, corrupt or asks for something we never do."""


class TrustError(CheckpointError):
    """A checkpoint asked to run code or to read files from outside itself."""


class OutputError(VLMError, ValueError):
    """An output directory we may not write: not ours, the source itself, or in use."""


class TrainingError(VLMError, RuntimeError):
    """A run that cannot train (nothing to train on, too many skipped samples)."""


class ExportError(VLMError, ValueError):
    """The model (or checkpoint) cannot be expressed in the other format; the message says why."""


class InstallError(VLMError, ImportError):
    """A dependency that is missing or installed in a combination that cannot work; the
    message names the command that fixes it."""

"""Our checkpoint format: ``config.json`` (every component's rebuild kwargs), safetensors
weights, the tokenizer and, with LoRA, the adapters. Only JSON and safetensors are read, and
nothing in a checkpoint can enable code or point outside it."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_model, save_model

from vlm_adapters._io import atomic_dir, package_versions, safetensors_problem
from vlm_adapters._transformers import FLOAT_DTYPES, load_or_explain
from vlm_adapters.chat.templates import TEMPLATES
from vlm_adapters.config import ModelConfig, model_config_from_dict
from vlm_adapters.errors import CheckpointError, ComponentError, ConfigError, TrustError
from vlm_adapters.model import lora
from vlm_adapters.model.files import (
    CONFIG_NAME,
    FORMAT,
    FORMAT_VERSION,
    TOKENIZER_DIR,
    WEIGHTS_NAME,
)
from vlm_adapters.plugins import BUILTIN_PROVIDER, get_registry, why_unavailable
from vlm_adapters.registry import KINDS

if TYPE_CHECKING:
    from vlm_adapters.model.core import VisionLanguageModel

PARTS = KINDS
TOP_LEVEL_KEYS = (
    "format",
    "format_version",
    *PARTS,
    *lora.CONFIG_KEYS.values(),
    "template",
    "providers",
    "versions",
)
"""Every top-level key of config.json any version of vlm-adapters has written."""
HUB_FILES = ("*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken")
"""What is downloaded of a hub checkpoint: configs, safetensors weights and tokenizer files
(never pickles or code)."""
DTypeLike = str | torch.dtype | None
"""``dtype`` of :meth:`VisionLanguageModel.from_pretrained`: ``"auto"``/None, a floating torch
dtype or its name."""
DeviceMap = str | int | torch.device | dict[str, Any] | None
"""``device_map`` of :meth:`VisionLanguageModel.from_pretrained`: one device, ``"auto"`` or
``{"": device}``."""


def save(
    model: VisionLanguageModel,
    directory: str | Path,
    *,
    overwrite: bool = False,
    protect: tuple[Path, ...] = (),
) -> Path:
    """Write ``model`` to ``directory`` atomically (see ``VisionLanguageModel.save_pretrained``)."""
    with atomic_dir(directory, overwrite=overwrite, protect=protect) as tmp:
        model.tokenizer.save_pretrained(tmp / TOKENIZER_DIR)
        (tmp / CONFIG_NAME).write_text(json.dumps(checkpoint_config(model), indent=2))
        if lora.has_lora(model) or lora.is_quantized(model):
            lora.save_lora(model, tmp, WEIGHTS_NAME)
        else:
            save_model(model, str(tmp / WEIGHTS_NAME))
    return Path(directory)


def checkpoint_config(model: VisionLanguageModel) -> dict[str, Any]:
    """Every component with the kwargs that rebuild it offline, plus package versions."""
    registry = get_registry()
    parts = {"vision": model.vision, "connector": model.connector, "llm": model.llm}
    sections = {
        k: {"type": model.component_types[k], **m.rebuild_kwargs()} for k, m in parts.items()
    }
    if model.video is not None:
        sections["vision"]["video"] = model.video.model_dump()
    providers = {k: registry.get(k, model.component_types[k]).provider for k in parts}
    versions = package_versions("vlm-adapters", "torch", "transformers", *set(providers.values()))
    template = {"template": model.template} if model.template else {}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **sections,
        **lora.lora_checkpoint_config(model),
        **template,
        "providers": providers,
        "versions": versions,
    }


def load(
    cls: type[VisionLanguageModel],
    source: str | Path,
    *,
    trust_remote_code: bool = False,
    dtype: DTypeLike = None,
    device_map: DeviceMap = None,
    revision: str | None = None,
) -> VisionLanguageModel:
    """Build ``cls`` from a checkpoint's config.json and load its weights (see
    ``VisionLanguageModel.from_pretrained``)."""
    torch_dtype, device = placement(dtype, device_map)
    directory = checkpoint_dir(source, revision)
    data = read_checkpoint_config(directory)
    config = _checkpoint_model_config(data, directory, trust_remote_code)
    if getattr(config.llm.params, "quantization", None) is not None:
        _refuse_placing_quantized(directory, torch_dtype, device_map)
    config = _with_dtype(config, torch_dtype)
    weights = directory / WEIGHTS_NAME
    problem = safetensors_problem(weights)
    if problem:
        raise CheckpointError(f"{problem}; the checkpoint is incomplete or corrupt")
    model = cls.from_config(config)
    try:
        if lora.is_quantized(model) or any(key in data for key in lora.CONFIG_KEYS.values()):
            lora.load_lora(model, directory, data)
        else:
            load_model(model, str(weights), strict=True)
    except RuntimeError as error:
        raise CheckpointError(
            f"{weights}: the weights do not fit the model its config.json describes "
            f"({str(error).strip().splitlines()[0][:200]})"
        ) from None
    model.template = data.get("template")
    return place(model, torch_dtype, device)


def checkpoint_dir(source: str | Path, revision: str | None = None) -> Path:
    """The local directory of ``source``: itself, or a hub id's snapshot (at ``revision``) of
    its configs, safetensors and tokenizer files (see :data:`HUB_FILES`)."""
    path = Path(source)
    if path.is_dir():
        if revision is not None:
            raise CheckpointError(
                f"{source}: revision={revision!r} applies to hub ids, and this is a local "
                "directory; remove revision"
            )
        return path
    if path.exists() or not _is_repo_id(str(source)):
        raise CheckpointError(f"{source}: no such checkpoint directory")
    from huggingface_hub import snapshot_download

    return Path(
        load_or_explain(
            "checkpoint",
            str(source),
            lambda: snapshot_download(
                str(source), revision=revision, allow_patterns=list(HUB_FILES)
            ),
        )
    )


def _is_repo_id(text: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return not text.startswith((".", "~"))


def placement(dtype: DTypeLike, device_map: DeviceMap) -> tuple[torch.dtype | None, Any]:
    """``(dtype, device)`` that ``dtype`` and ``device_map`` ask for (None: as the checkpoint
    has it), checked before anything is loaded."""
    return _torch_dtype(dtype), _device(device_map)


def place(
    model: VisionLanguageModel, dtype: torch.dtype | None, device: Any
) -> VisionLanguageModel:
    """``model`` cast to ``dtype`` (its floating-point weights) and moved to ``device``."""
    kwargs = {k: v for k, v in (("dtype", dtype), ("device", device)) if v is not None}
    return model.to(**kwargs) if kwargs else model


def _torch_dtype(dtype: DTypeLike) -> torch.dtype | None:
    if dtype is None or dtype == "auto":
        return None
    name = str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else dtype
    if isinstance(name, str) and name in FLOAT_DTYPES:
        return getattr(torch, name)
    raise ConfigError(
        f"dtype={dtype!r}: use 'auto' (as the checkpoint records), a floating torch dtype or one "
        f"of {', '.join(FLOAT_DTYPES)}"
    )


def _device(device_map: DeviceMap) -> torch.device | None:
    """The one device ``device_map`` names; the whole model goes there (never split)."""
    if device_map is None:
        return None
    if isinstance(device_map, dict) and set(device_map) == {""}:
        return _device(device_map[""])
    if device_map == "auto":
        return torch.device(_first_accelerator())
    if isinstance(device_map, (str, int, torch.device)) and not isinstance(device_map, bool):
        try:
            device = torch.device(device_map)
        except (RuntimeError, TypeError):
            device = None
        if device is not None and device.type != "meta":
            _check_available(device, device_map)
            return device
    raise ConfigError(
        f"device_map={device_map!r}: vlm-adapters places the whole model on one device; pass "
        "one ('cpu', 'cuda', 'cuda:1', 'mps'), 'auto' (the first accelerator, else the CPU) or "
        "{'': device}"
    )


def _first_accelerator() -> str:
    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.current_device()}"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _check_available(device: torch.device, asked: Any) -> None:
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ConfigError(
                f"device_map={asked!r}: this machine has {count} CUDA device(s); use 'cpu' or "
                "'auto'"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device_map={asked!r}: MPS is not available here; use 'cpu' or 'auto'")


def _refuse_placing_quantized(
    directory: Path, dtype: torch.dtype | None, device_map: DeviceMap
) -> None:
    """A quantized (bitsandbytes) checkpoint loads as its settings say, where bitsandbytes puts
    it: dtype and device_map cannot change that."""
    asked = [f"{k}={v!r}" for k, v in (("dtype", dtype), ("device_map", device_map)) if v]
    if asked:
        raise CheckpointError(
            f"{directory}: a quantized (bitsandbytes) checkpoint loads in the dtypes its "
            "llm section records, on the current CUDA device (the CPU without one); remove "
            f"{' and '.join(asked)}, or merge it first (vlm_adapters.merge_lora)"
        )


def _with_dtype(config: ModelConfig, dtype: torch.dtype | None) -> ModelConfig:
    """``config`` with every component that takes a ``dtype`` built in ``dtype`` (the others
    are cast after loading)."""
    if dtype is None:
        return config
    name = str(dtype).removeprefix("torch.")
    sections = {}
    for kind in PARTS:
        section = getattr(config, kind)
        if "dtype" in type(section.params).model_fields:
            params = section.params.model_copy(update={"dtype": name})
            sections[kind] = section.model_copy(update={"params": params})
    return config.model_copy(update=sections)


def read_checkpoint_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_NAME
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {CONFIG_NAME}; is this a vlm-adapters checkpoint?")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise CheckpointError(f"{path}: not valid JSON ({error}); the file is corrupt") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else None
        raise CheckpointError(f"{path}: not a vlm-adapters checkpoint (format={found!r})")
    return _READERS[format_version(data, path)](data, path)


def format_version(data: dict[str, Any], path: Path) -> int:
    """The format version of a checkpoint file's ``data`` (1 when absent: earlier releases
    wrote none); one newer than this code reads is refused."""
    version = data.get("format_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{path}: format_version {version!r} is not a version; corrupt")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version {version} was written by a newer vlm-adapters (this one "
            f"reads up to {FORMAT_VERSION}); upgrade"
        )
    return version


def _read_v1(data: dict[str, Any], path: Path) -> dict[str, Any]:
    """A version-1 config.json, as the loader takes it."""
    check_top_level_keys(data, path)
    return data


_READERS: dict[int, Callable[[dict[str, Any], Path], dict[str, Any]]] = {1: _read_v1}
"""The reader of each format version this code knows."""


def check_top_level_keys(data: dict[str, Any], path: Path) -> None:
    """Refuse a key we never write: it would be ignored, and what it asks for not done."""
    unknown = [key for key in data if key not in TOP_LEVEL_KEYS]
    if not unknown:
        return
    versions = data.get("versions")
    written = versions.get("vlm-adapters") if isinstance(versions, dict) else None
    ours = package_versions("vlm-adapters")["vlm-adapters"]
    raise CheckpointError(
        f"{path}: unknown top-level key {unknown[0]!r} (written by vlm-adapters {written}, this "
        f"is {ours}); a newer vlm-adapters may know it: upgrade, or remove the key if it was "
        "added by hand"
    )


def _checkpoint_model_config(
    data: dict[str, Any], directory: Path, trust_remote_code: bool
) -> ModelConfig:
    """The checkpoint's sections, validated, with nothing in them that runs code or reads
    outside the checkpoint; the tokenizer is the checkpoint's own."""
    where = str(directory / CONFIG_NAME)
    for kind in PARTS:
        if not isinstance(data.get(kind), dict) or "type" not in data[kind]:
            raise CheckpointError(f"{where}: no valid `{kind}` section; the file is corrupt")
    _require_components(data)
    asks = asks_for_remote_code(data)
    if asks and not trust_remote_code:
        raise TrustError(
            f"{where} asks to run code shipped with the model ({asks}: true); vlm-adapters never "
            "takes that from a checkpoint: if you trust where it came from, pass "
            "--trust-remote-code (Python: trust_remote_code=True)"
        )
    if "tokenizer" in data["llm"]:
        raise TrustError(f"{where}: llm.tokenizer names a tokenizer outside the checkpoint")
    if data.get("template") is not None and data["template"] not in TEMPLATES:
        raise CheckpointError(f"{where}: unknown chat template {data['template']!r}")
    sections = {k: data[k] for k in PARTS}
    sections["llm"] = {**sections["llm"], "tokenizer": str(directory / TOKENIZER_DIR)}
    try:
        config = model_config_from_dict(sections, where)
    except ConfigError as error:
        raise CheckpointError(f"{error}") from None
    for kind in PARTS:
        outside = {
            k: v for k, v in getattr(config, kind).params.sources().items() if k != "tokenizer"
        }
        if outside:
            key, value = next(iter(outside.items()))
            raise TrustError(
                f"{where}: {kind}.{key} = {value!r} would load weights or files from outside "
                "the checkpoint, which carries its own; refusing to load it"
            )
    return config


def asks_for_remote_code(value: Any, where: str = "") -> str | None:
    """The first ``trust_remote_code: true`` anywhere in ``value`` (its dotted key), or None."""
    if isinstance(value, dict):
        for key, item in value.items():
            here = f"{where}.{key}" if where else str(key)
            if key == "trust_remote_code" and item:
                return here
            found = asks_for_remote_code(item, here)
            if found:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = asks_for_remote_code(item, f"{where}[{index}]")
            if found:
                return found
    return None


def _require_components(data: dict[str, Any]) -> None:
    """Name every component of the checkpoint that is missing here, with the package it comes
    from and why it is missing (not installed, failed to load, disabled, incompatible)."""
    registry = get_registry()
    missing: list[str] = []
    to_install: dict[str, None] = {}  # packages, in order, once each
    for kind in PARTS:
        name, provider = data[kind]["type"], data.get("providers", {}).get(kind, "unknown")
        if name in registry.names(kind):
            continue
        what = f"the {kind} component {name!r}, which"
        if provider == BUILTIN_PROVIDER:
            newer = "it may come from a newer version"
            missing.append(f"{what} this version of vlm-adapters does not have; {newer}")
            continue
        reason = why_unavailable(provider)
        if reason is None:
            to_install[provider] = None
        source = f"its config.json says comes from the package {provider!r}"
        missing.append(f"{what} {source}; {reason or 'it is not installed'}")
    if missing:
        count = "" if len(missing) == 1 else f"{len(missing)} components: "
        them = "it" if len(to_install) == 1 else "them"
        advice = f": if you trust {them}, run `pip install {' '.join(to_install)}`"
        message = f"this checkpoint needs {count}" + "; ".join(missing)
        raise ComponentError(message + (advice if to_install else ""))

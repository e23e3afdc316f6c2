"""One row of a data source (TRL's ``messages`` + ``images``, or LLaVA's ``conversations`` +
``image``) as the LLaVA record the dataset reads."""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

from PIL import Image, UnidentifiedImageError

from vlm_adapters.chat.templates import IMAGE_MARKER
from vlm_adapters.data.pairs import is_pair, pair_of_row
from vlm_adapters.data.records import BadSample

ROLES = {"user": "human", "assistant": "gpt", "system": "system"}
"""TRL message roles -> LLaVA ``from`` values."""


def to_record(row: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The LLaVA record (``conversations`` + ``image``, ``id``) of one row: TRL's ``messages``
    + ``images`` (or images inside the image parts), or LLaVA's ``conversations`` +
    ``image``. Embedded images (``{"bytes",
    "path"}`` dicts, raw bytes) become PIL images; paths stay paths (read under
    ``image_root``). A preference pair (TRL's ``prompt`` / ``chosen`` / ``rejected``, or a
    LLaVA pair) becomes a pair record (`pair_of_row`). ``where`` names the row in errors; a
    row that cannot be used is a `BadSample`."""
    if not isinstance(row, Mapping):
        raise BadSample("bad row", f"{where}: expected a mapping, got {type(row).__name__}")
    if is_pair(row):
        return pair_of_row(row, where, turns_of_messages, _images)
    if row.get("messages") is not None:
        inline: list[Any] = []
        conversations = turns_of_messages(row["messages"], where, inline)
        images = next((row[k] for k in ("images", "image") if row.get(k) is not None), inline)
    elif row.get("conversations") is not None:
        conversations, images = row["conversations"], row.get("image")
    else:
        raise BadSample(
            "bad row", f"{where}: no 'messages' (TRL) or 'conversations' (LLaVA) in the row"
        )
    record: dict[str, Any] = {"conversations": conversations}
    if row.get("id") is not None:
        record["id"] = row["id"] if isinstance(row["id"], (int, str)) else str(row["id"])
    image = _images(images, where)
    if image is not None:
        record["image"] = image
    return record


def turns_of_messages(messages: Any, where: str, inline: list[Any]) -> list[dict[str, str]]:
    """TRL ``messages`` as LLaVA turns: image parts become ``<image>`` where they stood;
    images held by the parts themselves (``{"type": "image", "image": ...}``) go to
    ``inline``."""
    if not isinstance(messages, list):
        raise BadSample("bad conversation", f"{where}: 'messages' must be a list")
    turns = []
    for number, message in enumerate(messages):
        if not isinstance(message, Mapping) or message.get("role") not in ROLES:
            raise BadSample(
                "bad conversation",
                f"{where}: message {number} needs a role of {', '.join(ROLES)}: {message!r}",
            )
        text = _content_text(message.get("content"), f"{where}: message {number}", inline)
        turns.append({"from": ROLES[message["role"]], "value": text})
    return turns


def _content_text(content: Any, where: str, inline: list[Any]) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadSample("bad conversation", f"{where}: content must be a string or a list")
    pieces = []
    for part in content:
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "image":
            pieces.append(IMAGE_MARKER)
            if part.get("image") is not None:
                inline.append(part["image"])
        elif kind == "text" and isinstance(part.get("text"), str):
            pieces.append(part["text"])
        else:
            raise BadSample(
                "bad conversation",
                f"{where}: a content part must be {{'type': 'text', 'text': str}} or "
                f"{{'type': 'image'}}, got {part!r}",
            )
    return "".join(pieces)


def _images(images: Any, where: str) -> Any:
    """One image, a list of them, or None (text-only)."""
    if images is None:
        return None
    if isinstance(images, list):
        if not images:
            return None
        return [_image(image, f"{where}: image {i}") for i, image in enumerate(images)]
    return _image(images, where)


def _image(image: Any, where: str) -> Image.Image | str:
    """A PIL image (embedded bytes decoded lazily: the header is read now) or a path."""
    if isinstance(image, (Image.Image, str)):
        return image
    if isinstance(image, Mapping):
        if image.get("bytes") is not None:
            image = image["bytes"]
        elif isinstance(image.get("path"), str):
            return image["path"]
    if isinstance(image, (bytes, bytearray, memoryview)):
        try:
            return Image.open(io.BytesIO(bytes(image)))
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
            raise BadSample("image unreadable", f"{where}: {error}") from None
    raise BadSample(
        "bad image field",
        f"{where}: an image must be a PIL image, bytes, a path or a {{'bytes', 'path'}} dict, "
        f"got {type(image).__name__}",
    )

"""Opening images safely: paths confined to a root, sizes checked before decoding."""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator
from pathlib import Path

from PIL import Image, ImageFile

from vlm_adapters.errors import DataError

MAX_IMAGE_PIXELS = 89_478_485
"""Default cap on width x height (PIL's own decompression-bomb threshold)."""


class ImageProblem(DataError):
    """An image that cannot be used; ``reason`` is a short category for skip counts."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def confined_path(root: str | Path, relative: str, kind: str = "image") -> Path:
    """``root / relative`` with symlinks and ``..`` resolved; ImageProblem if it leaves root
    (``kind``: what the file is, naming its root, ``image_root`` or ``video_root``)."""
    base = Path(root).resolve()
    path = (base / relative).resolve()
    if path != base and base not in path.parents:
        raise ImageProblem(
            f"{kind} outside {kind}_root",
            f"{relative!r} resolves to {path}, outside {base}; keep {kind}s under {kind}_root",
        )
    return path


def open_image(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """The image at ``path``, fully decoded, as RGB.

    ImageProblem when it is missing, not an image, truncated, or larger than ``max_pixels``
    (read from its header, before any pixel is decoded). A truncated image is refused even
    where a library set PIL's process-wide ``LOAD_TRUNCATED_IMAGES`` (lmms-eval does on import).
    """
    path = Path(path)
    if not path.is_file():
        raise ImageProblem("image missing", f"{path} not found")
    return _decoded(path, str(path), max_pixels)


def decode_image(data: bytes, name: str, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """An image embedded as ``data`` (a shard's bytes, called ``name`` in problems), checked
    and decoded as `open_image` does a file."""
    return _decoded(io.BytesIO(data), name, max_pixels)


def _decoded(source: Path | io.BytesIO, name: str, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings(), _whole_images_only():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise ImageProblem(
                        "image too large",
                        f"{name} is {width}x{height} = {width * height:,} pixels, over the "
                        f"limit of {max_pixels:,} (data.max_image_pixels)",
                    )
                return image.convert("RGB")
    except ImageProblem:
        raise
    except Image.DecompressionBombError as error:
        raise ImageProblem("image too large", f"{name}: {error}") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageProblem("image unreadable", f"{name}: {error}") from None


@contextlib.contextmanager
def _whole_images_only() -> Iterator[None]:
    """PIL refuses truncated images inside, whatever the process-wide setting is."""
    setting = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = setting

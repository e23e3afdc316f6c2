"""Image and video geometry: how many visual tokens an image or a video becomes, from numbers
alone (no torch).

One set of functions for every caller (config validation, the model, the processor, export):
a fixed-size tower's tokens through the connector, pooled patch grids, AnyRes tiling
(LLaVA-NeXT's grid choice, tiles, padding removal and end-of-row tokens), the bounds a
NaFlex tower's ``max_num_patches`` sets, and videos: frames sampled from a header's duration,
tokens per pooled frame and per video, and the frames a per-sample budget leaves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

from vlm_adapters.errors import ConfigError

Size = tuple[int, int]
"""An image's (height, width) in pixels."""
Grid = tuple[int, int]
"""Tiles (or patches, or tokens) as (rows, cols)."""
LLAVA_NEXT_GRIDS: tuple[Grid, ...] = ((1, 2), (2, 1), (2, 2), (1, 3), (3, 1))
"""LLaVA-NeXT's grid_pinpoints (336x672, 672x336, 672x672, 336x1008, 1008x336) in tiles."""


class ConnectorShape(Protocol):
    """What geometry needs of a connector's config (``ConnectorConfig`` has it)."""

    per_token: bool

    def num_output_tokens(self, num_input_tokens: int) -> int: ...

    def output_grid(self, rows: int, cols: int) -> Grid | None: ...


def square_side(num_tokens: int) -> int | None:
    """The side of a square grid of ``num_tokens``, None when they do not make one."""
    side = math.isqrt(num_tokens)
    return side if side * side == num_tokens else None


def pooled_grid(rows: int, cols: int, factor: int) -> Grid:
    """A ``rows x cols`` patch grid pooled with stride ``factor``; ValueError when it does not
    divide the grid."""
    if rows % factor or cols % factor:
        raise ValueError(
            f"pool factor {factor} does not divide the {rows}x{cols} patch grid; "
            "choose a factor that divides it"
        )
    return rows // factor, cols // factor


def pool_grid_side(num_tokens: int) -> int:
    """The side of the square patch grid a pooling connector takes; ValueError when
    ``num_tokens`` do not make one."""
    side = square_side(num_tokens)
    if side is None:
        raise ValueError(f"pool needs a square patch grid, got {num_tokens} tokens")
    return side


def pooled_tokens(num_tokens: int, factor: int) -> int:
    """Tokens left of a square patch grid of ``num_tokens`` pooled with stride ``factor``."""
    side = pool_grid_side(num_tokens)
    rows, cols = pooled_grid(side, side, factor)
    return rows * cols


def tile_grids(max_tiles: int | None) -> tuple[Grid, ...]:
    """The default tile grids: every grid of at most ``max_tiles`` tiles, or LLaVA-NeXT's."""
    if max_tiles is None:
        return LLAVA_NEXT_GRIDS
    return tuple((r, c) for r in range(1, max_tiles + 1) for c in range(1, max_tiles // r + 1))


@dataclass(frozen=True)
class AnyResLayout:
    """Where an image's tiles go and which of their tokens are kept: LLaVA-NeXT's arithmetic.

    ``tile`` is the tower's input size in pixels; ``side`` the tokens per tile side after the
    connector (the patch grid, or less after pooling).
    """

    grids: tuple[Grid, ...]
    tile: int
    side: int = field(repr=False)  # the connector's, not the pixels': not in a cache key

    def best_grid(self, height: int, width: int) -> Grid:
        """The grid that keeps the most of the image's pixels, then wastes the least."""
        best, best_kept, best_waste = self.grids[0], -1, math.inf
        for rows, cols in self.grids:
            canvas_h, canvas_w = rows * self.tile, cols * self.tile
            scale = min(canvas_w / width, canvas_h / height)
            kept = min(int(width * scale) * int(height * scale), width * height)
            waste = canvas_h * canvas_w - kept
            if kept > best_kept or (kept == best_kept and waste < best_waste):
                best, best_kept, best_waste = (rows, cols), kept, waste
        return best

    def fitted(self, height: int, width: int) -> tuple[Grid, Size]:
        """The best grid and the image's size inside it (aspect ratio kept, one side full)."""
        rows, cols = self.best_grid(height, width)
        canvas_h, canvas_w = rows * self.tile, cols * self.tile
        by_width, by_height = canvas_w / width, canvas_h / height
        if by_width < by_height:
            return (rows, cols), (min(math.ceil(height * by_width), canvas_h), canvas_w)
        return (rows, cols), (canvas_h, min(math.ceil(width * by_height), canvas_w))

    def kept(self, height: int, width: int) -> tuple[int, int, int, int]:
        """``(top, rows, left, cols)``: the part of the grid's token map that shows the image
        (the padding's rows or columns removed, the same number on both sides)."""
        grid_rows, grid_cols = self.best_grid(height, width)
        rows, cols = grid_rows * self.side, grid_cols * self.side
        if width / height > cols / rows:  # padded above and below
            shown = int(round(height * (cols / width), 7))
            pad = (rows - shown) // 2
            return pad, rows - 2 * pad, 0, cols
        shown = int(round(width * (rows / height), 7))
        pad = (cols - shown) // 2
        return 0, rows, pad, cols - 2 * pad

    def num_tiles(self, height: int, width: int) -> int:
        """Rows of vision input for the image: its overview and its tiles."""
        rows, cols = self.best_grid(height, width)
        return 1 + rows * cols

    def num_tokens(self, height: int, width: int) -> int:
        """Visual tokens of the image: the overview's, then every kept row and its end."""
        _, rows, _, cols = self.kept(height, width)
        return self.side**2 + rows * (cols + 1)

    def max_tokens(self) -> int:
        """The most visual tokens an image can give (its grid with nothing removed)."""
        return self.side**2 + max(r * self.side * (c * self.side + 1) for r, c in self.grids)


def naflex_patch_grid(size: Size, patch_size: int, max_num_patches: int) -> Grid:
    """The patch grid (rows, cols) a NaFlex processor resizes an image of ``size`` to: the
    largest scale (binary search, as transformers' SigLIP2) whose whole patches, at least one
    per side, number at most ``max_num_patches``."""

    def patches(scale: float, length: int) -> int:
        return max(1, math.ceil(length * scale / patch_size))

    low, high, eps = 1e-6, 100.0, 1e-5
    while high - low >= eps:
        scale = (low + high) / 2
        if patches(scale, size[0]) * patches(scale, size[1]) <= max_num_patches:
            low = scale
        else:
            high = scale
    return patches(low, size[0]), patches(low, size[1])


def check_tileable(native: bool) -> None:
    """AnyRes tiles only towers with a fixed input size, not ``native`` resolution ones."""
    if native:
        raise ConfigError(
            "vision.tiling: this tower encodes images at their own size (NaFlex) already; "
            "tiling is for towers with a fixed input size"
        )


def tile_token_side(
    num_patches: int, connector: ConnectorShape, name: str, key: str = "vision.tiling"
) -> int:
    """Tokens per tile (or video frame: ``key``) side after the ``name`` connector: it must
    keep the square patch grid (linear, mlp) or shrink it (pool)."""
    grid = square_side(num_patches)
    if grid is None:
        raise ConfigError(
            f"{key}: the tower gives {num_patches} patches per image, not a square "
            f"grid that {_laid_out(key)} can be laid out on"
        )
    try:
        tokens = connector.output_grid(grid, grid)
    except ValueError as exc:
        raise ConfigError(f"connector: {exc}") from None
    if tokens is None:
        raise ConfigError(
            f"{key}: the {name!r} connector's tokens have no place on the patch grid, so "
            f"{_laid_out(key)} cannot be laid out; use linear, mlp or pool, or implement "
            "`output_grid(rows, cols)` on the connector's config (the grid its tokens lie on, "
            "row by row; see Writing a plugin)"
        )
    return tokens[0]


def _laid_out(key: str) -> str:
    return "frames" if key == "vision.video" else "tiles"


def image_token_bound(
    num_patches: int,
    native: bool,
    grids: tuple[Grid, ...] | None,
    connector: ConnectorShape,
    name: str,
) -> int:
    """The most visual tokens one image can give: ``num_patches`` (N per image, per tile on
    AnyRes ``grids``, at most per image for a ``native`` resolution (NaFlex) tower) through the
    ``name`` connector."""
    if grids is not None:
        check_tileable(native)
    if native and not connector.per_token:
        raise ConfigError(
            f"connector: {name!r} cannot take a NaFlex tower's variable number of "
            "patches per image; use a per-token connector (linear, mlp), or set `per_token = "
            "True` on the connector's config if it maps every feature to one token"
        )
    if native:
        return num_patches
    if grids is None:
        try:
            return connector.num_output_tokens(num_patches)
        except ValueError as exc:
            raise ConfigError(f"connector: {exc}") from None
    side = tile_token_side(num_patches, connector, name)
    return AnyResLayout(grids, 1, side).max_tokens()


def check_token_bound(
    bound: int, context: int | None, *, tiled: bool = False, budget: int | None = None
) -> None:
    """One image's worst case must fit the tiling ``budget`` per sample and the LLM context
    (samples longer than the context are bad samples already: the budget may exceed it)."""
    if budget is not None and bound > budget:
        raise ConfigError(
            f"vision.tiling.max_visual_tokens: {budget} is below one image's worst case of "
            f"{bound} visual tokens; raise it, or use fewer tiles (grids, max_tiles)"
        )
    if context is not None and bound >= context:
        tiles = " (with tiling, at most)" if tiled else ""
        raise ConfigError(
            f"connector: {bound} visual tokens per image{tiles} do not fit the LLM context of "
            f"{context} positions; use a pooling/query connector or a smaller image size"
            + (", or fewer tiles (vision.tiling)" if tiled else "")
        )


def video_frame_tokens(side: int, pool: int) -> int:
    """Visual tokens of one video frame: its ``side`` x ``side`` token grid pooled with stride
    ``pool`` (bilinear, rounding up: OneVision's 27 -> 14 for 2)."""
    pooled = math.ceil(side / pool)
    return pooled * pooled


def video_tokens(frames: int, per_frame: int, newline: bool) -> int:
    """Visual tokens of a video of ``frames`` sampled frames: every frame's ``per_frame``,
    then one end token when ``newline``."""
    return frames * per_frame + int(newline)


def frames_within_budget(
    frames: list[int], per_frame: int, newline: bool, budget: int, fixed: int = 0
) -> list[int] | None:
    """Each video's frame count, cut (the longest first) so that the videos' tokens plus
    ``fixed`` others (a sample's images) fit ``budget``; None when not even one frame per
    video fits."""
    room = budget - fixed - len(frames) * int(newline)
    allowed = room // per_frame if per_frame else sum(frames)
    if allowed < len(frames):
        return None
    counts = list(frames)
    while sum(counts) > allowed:
        longest = max(range(len(counts)), key=counts.__getitem__)
        counts[longest] -= 1
    return counts


@dataclass(frozen=True)
class Sampling:
    """How frames are taken from a video: ``num_frames`` of them, or ``fps`` per second;
    at most ``max_frames`` either way."""

    num_frames: int | None = 8
    fps: float | None = None
    max_frames: int = 64

    def __post_init__(self) -> None:
        if (self.num_frames is None) == (self.fps is None):
            raise ConfigError("vision.video: give exactly one of num_frames and fps")

    def count(self, duration: float, frames: int) -> int:
        """Frames sampled from a video of ``duration`` seconds holding about ``frames``
        frames (0: unknown): never more than it holds, at least one."""
        wanted = self.num_frames if self.num_frames is not None else duration * self.fps
        count = min(self.max_frames, max(1, math.floor(wanted)))
        return min(count, frames) if frames > 0 else count

    def times(self, duration: float, count: int) -> list[float]:
        """The ``count`` sampling times (seconds from the start): centres of equal spans."""
        return [(index + 0.5) * duration / count for index in range(count)]

    def key(self) -> str:
        """The settings as text (for cache keys)."""
        return f"num_frames={self.num_frames},fps={self.fps},max_frames={self.max_frames}"

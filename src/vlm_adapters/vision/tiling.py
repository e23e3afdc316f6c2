"""AnyRes tiling (LLaVA-NeXT) for any vision backbone whose input size is fixed.

An image is fitted into the tile grid that keeps the most of its pixels (then wastes the
least), resized with its aspect ratio kept, padded with black to the grid and cut into
tiles of the tower's input size; a downscaled overview of the whole image comes first. The
tower encodes every tile of a batch in one pass. The tiles' tokens are put back on the grid,
the rows and columns that only hold padding are removed, and a learned end-of-row token
(``connector.image_newline``) closes every row. The arithmetic is LLaVA-NeXT's, so a
transformers ``LlavaNextForConditionalGeneration`` computes the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator

from vlm_adapters.geometry import AnyResLayout, Grid, Size, tile_grids
from vlm_adapters.vision.base import (
    ImageBatch,
    ImageTransform,
    VariableTransform,
    VisionBackbone,
    image_functional,
)
from vlm_adapters.vision.hf_processor import (
    ProcessorTransform,
    processor_config,
    processor_from_config,
)


class TilingConfig(BaseModel):
    """``vision.tiling``: cut images into tiles of the tower's input size (AnyRes)."""

    model_config = ConfigDict(extra="forbid")

    grids: list[tuple[PositiveInt, PositiveInt]] | None = Field(
        None,
        description="Tile grids (rows, cols) an image may be fitted into: LLaVA-NeXT's "
        "grid_pinpoints divided by the tile size. Default: every grid of at most `max_tiles` "
        "tiles, or LLaVA-NeXT's five (1x2, 2x1, 2x2, 1x3, 3x1) without `max_tiles`.",
    )
    max_tiles: PositiveInt | None = Field(
        None, description="Most tiles per image (the overview not counted)."
    )
    max_visual_tokens: PositiveInt | None = Field(
        None,
        description="Most visual tokens per sample (all its images); samples over it are "
        "bad samples (data.on_bad_sample). Checked against one image's worst case.",
    )

    @model_validator(mode="after")
    def _grids_fit(self) -> TilingConfig:
        grids = self.grids
        if grids is not None and not grids:
            raise ValueError("grids: give at least one (rows, cols) grid")
        if grids is not None and len(set(grids)) != len(grids):
            raise ValueError(f"grids: {grids} lists a grid twice")
        for rows, cols in grids or []:
            if self.max_tiles is not None and rows * cols > self.max_tiles:
                raise ValueError(
                    f"grids: {rows}x{cols} has {rows * cols} tiles, over max_tiles="
                    f"{self.max_tiles}; drop it or raise max_tiles"
                )
        return self

    def resolved_grids(self) -> tuple[Grid, ...]:
        """The grids images are fitted into, in order (earlier wins a tie)."""
        if self.grids is not None:
            return tuple((rows, cols) for rows, cols in self.grids)
        return tile_grids(self.max_tiles)

    def around(self, backbone: VisionBackbone, side: int) -> VisionBackbone:
        """``backbone`` run on this tiling's tiles, each giving ``side`` x ``side`` tokens
        after the connector (how the model builds a tiled tower without naming this module)."""
        return AnyResBackbone(backbone, self, side)


@dataclass(frozen=True)
class AnyResTransform(VariableTransform):
    """PIL image -> :class:`ImageBatch` of its overview and tiles ``[1 + T, 3, S, S]``.

    ``base`` is the tower's own preprocessing, applied to the overview (the whole image
    resized to a square) and to every tile. A transformers image processor (``hf`` towers)
    is run as transformers' ``LlavaNextImageProcessor`` with the same settings, so the pixels
    are exactly those a transformers LLaVA-NeXT sees; other towers' tiles are cut here.
    """

    base: ImageTransform
    layout: AnyResLayout
    token_budget: int | None = None
    processor: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def of(
        cls, base: ImageTransform, layout: AnyResLayout, token_budget: int | None = None
    ) -> AnyResTransform:
        processor = None
        if isinstance(base, ProcessorTransform):
            processor = processor_from_config(llava_next_processor_config(base, layout))
        return cls(base, layout, token_budget, processor)

    @property
    def max_tokens(self) -> int:
        return self.layout.max_tokens()

    @property
    def crop_size(self) -> int:
        """The tile size in pixels (the tower's input size)."""
        return self.layout.tile

    def num_tokens(self, size: Size) -> int:
        return self.layout.num_tokens(*size)

    def __call__(self, image: Image.Image) -> ImageBatch:
        values = self._processed(image) if self.processor is not None else self._cut(image)
        return ImageBatch(values, ((image.height, image.width),), (len(values),))

    def processor_config(self) -> dict[str, Any] | None:
        """The transformers image processor's JSON config (hf towers), else None."""
        return processor_config(self.processor) if self.processor is not None else None

    def _processed(self, image: Image.Image) -> torch.Tensor:
        if not getattr(self.processor, "do_convert_rgb", True):
            image = image.convert("RGB")
        out = self.processor(images=[image], return_tensors="pt")["pixel_values"][0]
        return out.float()  # [1 + T, 3, S, S]

    def _cut(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB")
        (rows, cols), (height, width) = self.layout.fitted(image.height, image.width)
        tvf = image_functional()
        tile, mode = self.layout.tile, tvf.InterpolationMode(self.base.interpolation)
        canvas = Image.new("RGB", (cols * tile, rows * tile))  # black padding
        resized = tvf.resize(image, [height, width], interpolation=mode)
        canvas.paste(resized, ((cols * tile - width) // 2, (rows * tile - height) // 2))
        square = self.base.resize or self.base.crop_size
        pieces = [tvf.resize(image, [square, square], interpolation=mode)]
        pieces += [
            canvas.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile))
            for r in range(rows)
            for c in range(cols)
        ]
        return torch.stack([self.base(piece) for piece in pieces])  # [1 + T, 3, S, S]


def llava_next_processor_config(base: ProcessorTransform, layout: AnyResLayout) -> dict[str, Any]:
    """``LlavaNextImageProcessor`` settings that tile like ``layout`` and treat every tile as
    the tower's own image processor does."""
    data = base.processor_config()
    tile = {"height": layout.tile, "width": layout.tile}
    return {
        **data,
        "image_processor_type": "LlavaNextImageProcessor",
        "image_grid_pinpoints": [[r * layout.tile, c * layout.tile] for r, c in layout.grids],
        "do_pad": True,
        "do_center_crop": bool(data.get("do_center_crop")),
        "crop_size": data.get("crop_size") or tile,
    }


class AnyResBackbone(VisionBackbone):
    """A fixed-size backbone run on AnyRes tiles: ``forward(ImageBatch) -> [tiles, N, D]``
    for every tile of the batch in one pass; :meth:`arrange` lays the tokens out per image."""

    def __init__(self, backbone: VisionBackbone, tiling: TilingConfig, side: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.tiling = tiling
        self.hidden_size = backbone.hidden_size
        self.num_patches = backbone.num_patches
        tile = backbone.transform.crop_size
        self.layout = AnyResLayout(tiling.resolved_grids(), tile, side)
        self.transform = AnyResTransform.of(
            backbone.transform, self.layout, tiling.max_visual_tokens
        )

    def features(self, pixel_values: torch.Tensor | ImageBatch) -> torch.Tensor:
        if not isinstance(pixel_values, ImageBatch):
            raise TypeError("an AnyRes backbone takes the ImageBatch its transform makes")
        return self.backbone(pixel_values.values)  # [U, N, D]

    def arrange(
        self,
        tokens: torch.Tensor,
        images: torch.Tensor | ImageBatch,
        newline: torch.Tensor | None = None,
    ) -> torch.Tensor:
        parts = images.split(tokens)  # each [1 + T, M, H]
        placed = [place(self.layout, p, size, newline) for p, size in zip(parts, images.sizes)]
        return torch.cat(placed)  # [K, H]

    def untiled(self) -> VisionBackbone:
        return self.backbone

    def rebuild_kwargs(self) -> dict[str, Any]:
        return {**self.backbone.rebuild_kwargs(), "tiling": self.tiling.model_dump()}

    def extra_repr(self) -> str:
        return f"grids={list(self.layout.grids)}, tile={self.layout.tile}"


def place(
    layout: AnyResLayout, tokens: torch.Tensor, size: Size, newline: torch.Tensor | None
) -> torch.Tensor:
    """One image's tile tokens ``[1 + T, side**2, H]`` (overview first) -> its visual tokens
    ``[K, H]``: the overview, then the grid ``layout`` keeps, row by row, each row ended by
    ``newline`` ``[H]``."""
    height, width = size
    (rows, cols), s = layout.best_grid(height, width), layout.side
    if tokens.shape[:2] != (1 + rows * cols, s * s):
        raise ValueError(
            f"an image of {width}x{height} needs 1 + {rows}x{cols} tiles of {s * s} tokens, "
            f"got {tokens.shape[0]} of {tokens.shape[1]}"
        )
    if newline is None:
        raise ValueError("AnyRes needs the connector's image_newline token")
    grid = tokens[1:].view(rows, cols, s, s, -1).permute(0, 2, 1, 3, 4)  # [r, s, c, s, H]
    grid = grid.reshape(rows * s, cols * s, -1)  # [R, C, H]
    top, kept_rows, left, kept_cols = layout.kept(height, width)
    grid = grid[top : top + kept_rows, left : left + kept_cols]  # [R', C', H]
    ends = newline.to(grid.dtype).expand(kept_rows, 1, -1)  # [R', 1, H]
    rows_out = torch.cat([grid, ends], dim=1).flatten(0, 1)  # [R' * (C' + 1), H]
    return torch.cat([tokens[0], rows_out])  # [K, H]

"""Image geometry is arithmetic alone: it imports no torch, and its NaFlex patch grid is
transformers' SigLIP2 one."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vlm_adapters.geometry import naflex_patch_grid, pooled_grid, pooled_tokens


def test_geometry_imports_no_torch() -> None:
    code = "import sys, vlm_adapters.geometry; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("patch, most", [(14, 256), (16, 64), (8, 49)])
def test_naflex_patch_grid_is_siglip2s(patch: int, most: int) -> None:
    from transformers.models.siglip2.image_processing_siglip2 import (
        get_image_size_for_max_num_patches,
    )

    for height, width in [(1, 1), (37, 1000), (480, 640), (1000, 37), (2048, 2047), (224, 224)]:
        pixels = get_image_size_for_max_num_patches(height, width, patch, most)
        assert naflex_patch_grid((height, width), patch, most) == (
            pixels[0] // patch,
            pixels[1] // patch,
        )


def test_pooling_needs_a_square_grid_the_factor_divides() -> None:
    assert pooled_tokens(16, 2) == 4 and pooled_grid(6, 4, 2) == (3, 2)
    with pytest.raises(ValueError, match="square patch grid"):
        pooled_tokens(12, 2)
    with pytest.raises(ValueError, match="does not divide the 4x4"):
        pooled_tokens(16, 3)

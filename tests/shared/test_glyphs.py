"""The rendered glyph dataset (shared/data/glyphs.py) on a small subset."""

from __future__ import annotations

import numpy as np
import pytest

from shared.data.glyphs import GlyphError, build_glyphs, font_files

FONTS = font_files()
pytestmark = pytest.mark.skipif(len(FONTS) < 2, reason="needs the DejaVu fonts (fonts-dejavu-core)")


def test_glyph_builder_is_deterministic_and_drops_look_alikes():
    fonts = FONTS[:4]
    chars = ["A", "\u0391", "B", "\u0436"]  # Latin A, Greek Alpha (same shape: dropped), B, Cyrillic zhe
    x, y, names = build_glyphs(fonts, samples_per_class=5, characters=chars)
    x2, y2, names2 = build_glyphs(fonts, samples_per_class=5, characters=chars)
    assert np.array_equal(x, x2) and np.array_equal(y, y2) and names == names2
    assert names == ["U+0041 A", "U+0042 B", "U+0436 \u0436"]
    assert x.shape == (15, 28, 28) and x.dtype == np.uint8 and np.bincount(y).tolist() == [5, 5, 5]
    assert all(x[y == c].std(0).mean() > 1.0 for c in range(3))  # samples differ (faces, jitter)
    assert all(x[i].max() > 100 for i in range(len(x)))  # every sample has ink


def test_glyph_builder_refuses_without_fonts(tmp_path):
    with pytest.raises(GlyphError, match="no .ttf"):
        build_glyphs([], samples_per_class=2)
    with pytest.raises(GlyphError, match="only 1"):
        build_glyphs(FONTS[:2], characters=["A"], samples_per_class=2)

"""A deterministic many-class glyph dataset rendered from installed fonts (for meta-learning).

Ten-class datasets are thin for meta-training (thesis §4.6.2 meta-trains on 64 classes); in
the spirit of notMNIST and Omniglot, each class here is one character (digits, Latin, Greek,
Cyrillic, Armenian, Hebrew, Georgian letters and symbols) and its samples are the typefaces
that have it (DejaVu's 22 faces on Debian) under a small affine jitter, 28x28 uint8 like MNIST.

Deterministic: the character list, the face order (sorted paths), and each sample's jitter
(numpy PCG64 keyed by class and sample index) are fixed; characters a face lacks are skipped
(detected by comparing with the face's .notdef rendering), and characters that render like an
earlier class in the reference face (Latin A and Greek Alpha) are dropped. Built only on
request (``edgeloop data glyphs --out FILE.npz``), never at import time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

DEFAULT_FONT_DIRS = ("/usr/share/fonts/truetype/dejavu",)
SIZE = 28
_CANVAS = 64  # rendered at this size, then reduced (antialiased) to SIZE
_POINTS = 40
_NOTDEF = "\U0010fffd"  # a private-use code point no font maps


def _ranges(*spans: tuple[int, int]) -> list[str]:
    return [chr(c) for lo, hi in spans for c in range(lo, hi + 1)]


CHARACTERS: tuple[str, ...] = tuple(
    [chr(c) for c in range(0x30, 0x3A)]  # digits
    + _ranges((0x41, 0x5A), (0x61, 0x7A))  # Latin
    + [c for c in _ranges((0x391, 0x3A9), (0x3B1, 0x3C9)) if c != "\u03a2"]  # Greek
    + _ranges((0x410, 0x44F))  # Cyrillic
    + _ranges((0x531, 0x556), (0x561, 0x586))  # Armenian
    + _ranges((0x5D0, 0x5EA))  # Hebrew
    + _ranges((0x10D0, 0x10FA))  # Georgian
    + list("!#$%&*+/<=>?@[]{}~^§¶©®±×÷€£¥∞≈≠≤≥∑∏√∫∂♠♣♥♦★☆☺♪")
)


class GlyphError(ValueError):
    """No usable font, or too few classes for the request."""


def font_files(dirs: Sequence[str | Path] = DEFAULT_FONT_DIRS) -> list[Path]:
    """The .ttf/.otf files under ``dirs``, sorted (the face order of the dataset)."""
    out: list[Path] = []
    for d in dirs:
        p = Path(d)
        if p.is_dir():
            out += [f for f in p.rglob("*") if f.suffix.lower() in (".ttf", ".otf") and f.is_file()]
    return sorted(set(out))


def _render(font: object, ch: str, angle: float, scale: float, dx: float, dy: float) -> np.ndarray:
    from PIL import Image, ImageDraw

    img = Image.new("L", (_CANVAS, _CANVAS), 0)
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = draw.textbbox((0, 0), ch, font=font)  # type: ignore[arg-type]
    draw.text(((_CANVAS - (right - left)) / 2 - left, (_CANVAS - (bottom - top)) / 2 - top), ch, fill=255,
              font=font)  # type: ignore[arg-type]  # fmt: skip
    # Inverse affine map about the centre: rotate by angle, scale, shift by (dx, dy) canvas pixels.
    a, c0 = math.radians(angle), _CANVAS / 2
    cos, sin = math.cos(a) / scale, math.sin(a) / scale
    coeffs = (cos, sin, c0 - cos * (c0 + dx) - sin * (c0 + dy), -sin, cos, c0 + sin * (c0 + dx) - cos * (c0 + dy))
    img = img.transform(img.size, Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR)
    return np.asarray(img.resize((SIZE, SIZE), Image.Resampling.LANCZOS), dtype=np.uint8)


def _has_glyph(font: object, ch: str) -> bool:
    mask = font.getmask(ch)  # type: ignore[attr-defined]
    if mask.getbbox() is None:  # blank (a space-like character)
        return False
    notdef = font.getmask(_NOTDEF)  # type: ignore[attr-defined]
    return bool(mask.size != notdef.size or bytes(mask) != bytes(notdef))


def build_glyphs(fonts: Sequence[str | Path] | None = None, *, samples_per_class: int = 20, min_faces: int = 2,
                 characters: Sequence[str] = CHARACTERS, max_classes: int | None = None, seed: int = 0,
                 ) -> tuple[np.ndarray, np.ndarray, list[str]]:  # fmt: skip
    """(images (N, 28, 28) uint8, labels (N,) int64, class names) with exactly
    ``samples_per_class`` samples per class: sample i of a class uses face i mod F of the F faces
    that have it, jittered (rotation ±8°, scale 0.85-1.1, shift ±3 canvas px) by PCG64(seed,
    class code point, i). ``max_classes`` keeps the first classes (for tests)."""
    from PIL import ImageFont

    paths = [Path(p) for p in fonts] if fonts is not None else font_files()
    if not paths:
        raise GlyphError(f"no .ttf/.otf fonts found (looked in {', '.join(DEFAULT_FONT_DIRS)}; "
                         "install fonts-dejavu-core or pass font files)")  # fmt: skip
    if samples_per_class < 1 or min_faces < 1:
        raise GlyphError("samples_per_class and min_faces must be >= 1")
    faces = [ImageFont.truetype(str(p), _POINTS) for p in sorted(paths)]
    images: list[np.ndarray] = []
    labels: list[int] = []
    names: list[str] = []
    references: list[np.ndarray] = []
    for ch in characters:
        if max_classes is not None and len(names) >= max_classes:
            break
        having = [f for f in faces if _has_glyph(f, ch)]
        if len(having) < min_faces:
            continue
        ref = _render(having[0], ch, 0.0, 1.0, 0.0, 0.0).astype(np.int16)
        if any(np.abs(ref - r).mean() < 6.0 for r in references):  # looks like an earlier class
            continue
        references.append(ref)
        rng = np.random.Generator(np.random.PCG64([seed, ord(ch)]))
        jitter = rng.uniform([-8.0, 0.85, -3.0, -3.0], [8.0, 1.1, 3.0, 3.0], size=(samples_per_class, 4))
        for i in range(samples_per_class):
            images.append(_render(having[i % len(having)], ch, *jitter[i]))
            labels.append(len(names))
        names.append(f"U+{ord(ch):04X} {ch}")
    if len(names) < 2:
        raise GlyphError(f"only {len(names)} glyph classes could be rendered from {len(paths)} fonts")
    return np.stack(images), np.asarray(labels, dtype=np.int64), names

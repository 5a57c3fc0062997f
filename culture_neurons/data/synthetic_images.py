"""The synthetic cultures' images: each culture's palette (a hue) as background, 2-4 of its
motifs in the opposite hue, and gray clutter shared by all cultures (PNG bytes; see
:mod:`culture_neurons.data.synthetic`)."""

from __future__ import annotations

import colorsys
import io
import math
import random
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from culture_neurons.data.synthetic import SyntheticCulture


def _rgb(hue: float, saturation: float, value: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(hue % 1.0, saturation, value)
    return int(r * 255), int(g * 255), int(b * 255)


def _draw_motif(draw: Any, motif: str, cx: float, cy: float, r: float, color: tuple) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if motif == "circle":
        draw.ellipse(box, fill=color)
    elif motif == "ring":
        draw.ellipse(box, outline=color, width=max(2, int(r / 3)))
    elif motif == "square":
        draw.rectangle(box, fill=color)
    elif motif == "hstripes":
        for k in range(3):
            y = cy - r + k * r
            draw.rectangle((cx - r, y, cx + r, y + r / 3), fill=color)
    elif motif == "vstripes":
        for k in range(3):
            x = cx - r + k * r
            draw.rectangle((x, cy - r, x + r / 3, cy + r), fill=color)
    elif motif == "cross":
        w = r / 3
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=color)
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=color)
    else:
        draw.polygon(_polygon(motif, cx, cy, r), fill=color)


def _polygon(motif: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if motif == "star":
        radii = [r if k % 2 == 0 else r * 0.45 for k in range(10)]
        angles = [math.pi / 2 + k * math.pi / 5 for k in range(10)]
    else:
        sides = {"triangle": 3, "diamond": 4, "hexagon": 6}[motif]
        radii = [r] * sides
        angles = [math.pi / 2 + k * 2 * math.pi / sides for k in range(sides)]
    return [
        (cx + q * math.cos(a), cy - q * math.sin(a)) for q, a in zip(radii, angles, strict=True)
    ]


def draw_image(culture: SyntheticCulture, rng: random.Random,
               size: int | tuple[int, int] = 64, vivid: bool = False) -> bytes:  # fmt: skip
    """PNG bytes: the culture's palette as background, 2-4 of its motifs, neutral clutter.
    ``size``: the side of a square image, or ``(width, height)``. ``vivid``: a saturated
    background with less hue noise (pastel by default), so that the cultures whose hues are
    nearest (0.09 apart for 8 cultures) differ clearly in colour."""
    from PIL import Image, ImageDraw

    width, height = (size, size) if isinstance(size, int) else size
    side = min(width, height)
    noise, saturation = (0.01, 0.8) if vivid else (0.03, 0.35)
    jitter = lambda: rng.uniform(-noise, noise)  # noqa: E731  (small hue noise per image)
    background = _rgb(culture.hue + jitter(), saturation, 0.92)
    img = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(1, 3)):  # clutter shared by all cultures: gray lines
        gray = rng.randint(90, 200)
        points = [rng.uniform(0, extent) for extent in (width, height, width, height)]
        draw.line(points, fill=(gray, gray, gray), width=1)
    for _ in range(rng.randint(2, 4)):
        r = rng.uniform(0.10, 0.20) * side
        cx, cy = rng.uniform(r, width - r), rng.uniform(r, height - r)
        color = _rgb(culture.hue + 0.5 + jitter(), 0.8, rng.uniform(0.45, 0.7))
        _draw_motif(draw, culture.motif, cx, cy, r, color)
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()

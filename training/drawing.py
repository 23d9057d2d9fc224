"""What the synthetic images and videos are drawn with: the colours, the shapes, a noisy background."""

from __future__ import annotations

import random

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 205, 30),
    "purple": (140, 50, 180),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle")


def background(rng: random.Random, size: tuple[int, int]) -> Image.Image:
    base = rng.randint(200, 245)
    # +-6 levels of noise: random bytes mapped through PIL's per-band table (5x faster than numpy integers)
    levels = [base - 6 + (v * 13 >> 8) for v in range(256)] * 3
    noise = np.random.default_rng(rng.randint(0, 2**31)).bytes(size[0] * size[1] * 3)
    return Image.frombytes("RGB", size, noise).point(levels)


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, color) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=color)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)


def font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()

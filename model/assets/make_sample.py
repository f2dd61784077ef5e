"""Draws ``sample.png``, the demo's bundled image (224x168: 16x12 patches, 2x2 windows with
edge windows), from shapes and gradients only. Run from this folder to regenerate it."""

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

WIDTH, HEIGHT = 224, 168


def draw() -> Image.Image:
    """The sample image: sky gradient, sun, two hills, a house and a striped field."""
    y = np.linspace(0.0, 1.0, HEIGHT)[:, None, None]
    sky = (1 - y) * np.array([70, 130, 210]) + y * np.array([250, 205, 160])
    pixels = np.broadcast_to(sky, (HEIGHT, WIDTH, 3)).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    draw.ellipse((150, 18, 190, 58), fill=(255, 220, 80))
    draw.polygon([(0, 120), (60, 70), (130, 120)], fill=(60, 120, 70))
    draw.polygon([(90, 120), (170, 80), (224, 115), (224, 120)], fill=(40, 100, 60))
    for i in range(8):
        shade = 90 + 12 * (i % 2)
        draw.rectangle((0, 120 + 6 * i, WIDTH, 126 + 6 * i), fill=(shade, 150, 60))
    draw.rectangle((30, 95, 70, 130), fill=(200, 60, 50))
    draw.polygon([(25, 95), (50, 75), (75, 95)], fill=(120, 40, 40))
    draw.rectangle((45, 112, 55, 130), fill=(80, 50, 30))
    return image


if __name__ == "__main__":
    draw().save(Path(__file__).with_name("sample.png"), optimize=True)

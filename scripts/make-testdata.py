#!/usr/bin/env python3
"""Regenerates testdata/garment.jpg (CC0): a T-shirt on a hanger. Needs Pillow."""
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

random.seed(7)
W, H = 900, 1100
im = Image.new("RGB", (W, H), (214, 210, 202))
px = im.load()
for y in range(H):
    for x in range(W):
        v = int(222 - 18 * y / H + random.randint(-3, 3))
        px[x, y] = (v, v - 3, v - 9)
d = ImageDraw.Draw(im)
d.line([(450, 120), (450, 170)], fill=(60, 60, 60), width=6)
d.arc([420, 80, 480, 140], 200, 360, fill=(60, 60, 60), width=6)
d.line([(250, 260), (450, 170), (650, 260)], fill=(70, 70, 70), width=7)
shirt = [(300, 250), (390, 215), (450, 240), (510, 215), (600, 250), (740, 360), (670, 450), (610, 400),
         (610, 930), (290, 930), (290, 400), (230, 450), (160, 360)]
d.polygon(shirt, fill=(32, 78, 140))
d.line(shirt + [shirt[0]], fill=(22, 55, 100), width=4)
d.ellipse([400, 215, 500, 275], fill=(200, 200, 205))
d.ellipse([408, 212, 492, 262], fill=(214, 210, 202))
d.rectangle([480, 420, 560, 500], outline=(20, 50, 95), width=3)
for y in range(300, 920, 40):
    d.line([(300, y), (600, y)], fill=(36, 84, 148), width=1)
im = im.filter(ImageFilter.GaussianBlur(0.6))
out = Path(__file__).resolve().parent.parent / "testdata" / "garment.jpg"
im.save(out, quality=88)
print(out, im.size)

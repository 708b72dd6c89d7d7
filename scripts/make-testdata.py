#!/usr/bin/env python3
"""Regenerates testdata/garment.jpg and testdata/dress.jpg (CC0): a T-shirt on
a wire hanger, and a dress on a wooden hanger wider than its shoulders.
Needs Pillow. The tests hold the garments' outlines (the known masks)."""
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

# A red dress on a wooden hanger that sticks out beyond its shoulders, on a
# cool light-grey sweep; the V neck shows the background and the hanger.
random.seed(11)
W, H = 800, 1000
im = Image.new("RGB", (W, H))
px = im.load()
for y in range(H):
    for x in range(W):
        v = int(236 - 30 * y / H + random.randint(-3, 3))
        px[x, y] = (v - 6, v - 2, v)
d = ImageDraw.Draw(im)
d.arc([375, 120, 425, 170], 180, 360, fill=(165, 165, 172), width=5)
d.line([(425, 145), (425, 170), (400, 215)], fill=(165, 165, 172), width=5)
d.line([(400, 215), (215, 285)], fill=(150, 100, 60), width=10)
d.line([(400, 215), (585, 285)], fill=(150, 100, 60), width=10)
dress = [(290, 240), (350, 240), (400, 300), (450, 240), (510, 240), (540, 330), (520, 480),
         (610, 900), (190, 900), (280, 480), (260, 330)]
d.polygon(dress, fill=(170, 32, 44))
d.line(dress + [dress[0]], fill=(120, 20, 30), width=3)
for y in range(500, 900, 30):
    d.line([(300, y), (500, y)], fill=(160, 28, 40), width=2)
im = im.filter(ImageFilter.GaussianBlur(0.6))
out = Path(__file__).resolve().parent.parent / "testdata" / "dress.jpg"
im.save(out, quality=88)
print(out, im.size)

"""An ImageFolder no built-in source covers, for trying `tans search` on unseen data.

    .venv/bin/python bench/make_georgian_letters.py [OUT] [--script SCRIPT]      # SCRIPT: one of the 7 below
    tans search --dataset /tmp/georgian_letters --max-params 3000000     # OUT defaults to /tmp/<script>_letters

10 letters of one script (Georgian U+10D0..U+10D9, Armenian U+0561..U+056A, Bengali
U+0995..U+099E, Cherokee U+13A0..U+13A9, Gurmukhi U+0A15..U+0A1E, Malayalam U+0D15..U+0D1E,
Tifinagh U+2D30..U+2D39), 150 images each, 64x64 greyscale, drawn with every
font on this machine whose character map covers all 10 (``fc-list ":charset=10d0 10d1 ..."``),
with a seeded random size, offset and rotation. No built-in source renders these scripts, so
neither the zoo nor the space has seen these classes (the nearest built-in relatives: Bengali is
akin to Devanagari, as is Gurmukhi, and several Cherokee letters look like Latin ones).
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

# the first of 10 consecutive letters
SCRIPTS = {"georgian": 0x10D0, "armenian": 0x0561, "bengali": 0x0995, "cherokee": 0x13A0, "gurmukhi": 0x0A15,
           "malayalam": 0x0D15, "tifinagh": 0x2D30}
PER_CLASS = 150
SIZE = 64


def script_fonts(letters: list[str]) -> list[str]:
    charset = ":charset=" + " ".join(f"{ord(ch):x}" for ch in letters)
    out = subprocess.run(["fc-list", charset, "file"], capture_output=True, text=True, check=False).stdout
    fonts = sorted(line.split(":")[0] for line in out.splitlines() if line.strip())
    if not fonts:
        raise SystemExit(f"error: no font with these letters found (fc-list {charset})")
    return fonts


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default=None, help="folder to write (default /tmp/<script>_letters)")
    parser.add_argument("--script", default="georgian", choices=sorted(SCRIPTS))
    ns = parser.parse_args(argv)
    script = ns.script
    letters = [chr(SCRIPTS[script] + i) for i in range(10)]
    out = Path(ns.out or f"/tmp/{script}_letters")
    fonts, rng = script_fonts(letters), random.Random(0)
    for i, ch in enumerate(letters):
        folder = out / f"letter_{i:02d}_{ch}"
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(PER_CLASS):
            font = ImageFont.truetype(rng.choice(fonts), rng.randint(30, 46))
            img = Image.new("L", (SIZE, SIZE), 0)
            draw = ImageDraw.Draw(img)
            left, top, right, bottom = draw.textbbox((0, 0), ch, font=font)
            x = (SIZE - (right - left)) / 2 - left + rng.uniform(-5, 5)
            y = (SIZE - (bottom - top)) / 2 - top + rng.uniform(-5, 5)
            draw.text((x, y), ch, fill=255, font=font)
            img.rotate(rng.uniform(-15, 15), resample=Image.BILINEAR).save(folder / f"{j:03d}.png")
    print(f"{len(letters) * PER_CLASS} images of {len(letters)} {script} letters from {len(fonts)} fonts in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

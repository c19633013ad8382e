"""Rendered characters: one source per writing system, drawn from the installed Debian fonts.

Why: many scripts give many related but distinct tasks (TANS' premise is that a model trained on
a related task transfers), all CPU-sized, with no download. A class is one character; its images
are that character in every font of the source that really draws it (see :mod:`fontscan`), with
a few seeded augmentations per font.

Rendering: white glyph on black, 32 px, drawn at 2x and box-downsampled (anti-aliasing). The font
size is a fixed fraction of the canvas and the glyph sits on a fixed baseline, centred on its
advance width -- it is *not* normalised to its bounding box, so upper and lower case keep their
size difference. Each (font, character, k) gets a seeded shift (+-2 px), rotation (+-10 deg),
scale (0.85-1.15) and stroke width (Pillow stroke_width 0 or 1 on the 2x canvas).

Train/test split is by font: a seeded ~25% of each source's font groups (a family and its clones,
:func:`fontscan.group_key`) are test fonts, so the test set measures generalisation to unseen
fonts. Only fonts that draw every character of the source are used, so every class has the same
fonts and ``A`` augmentations per font, with ``A`` chosen so a class gets ~450 images.
"""

from __future__ import annotations

import functools
import math
import unicodedata
import zlib

import numpy as np
from PIL import Image, ImageDraw

from tans.data.builtin import fontscan
from tans.data.builtin.base import TEST, TRAIN, BuiltinSource, ClassCounts, LoadedImages, SourceUnavailable

OUT = 32  # output size in pixels
SUPER = 2  # supersampling factor of the drawing canvas
FONT_SIZE = 0.55  # em size as a fraction of the canvas
TARGET_PER_CLASS = 450
TEST_FONT_FRACTION = 0.25

# Packages whose Latin-script designs are the font's own (the Latin letters of Thai, Hebrew or CJK
# fonts are often copies of these, which would leak designs between train and test fonts).
_EUROPEAN = ("fonts-cantarell", "fonts-cmu", "fonts-comic-neue", "fonts-croscore", "fonts-dancingscript",
             "fonts-dejavu-core", "fonts-ebgaramond", "fonts-gfs-artemisia", "fonts-gfs-didot",
             "fonts-linuxlibertine", "fonts-noto-core", "fonts-open-sans", "fonts-paratype", "fonts-urw-base35")
# Pan-European families that also draw Hebrew, Arabic, Devanagari or Thai. (fonts-liberation2 is not
# used anywhere: its designs are those of fonts-croscore, which would take its faces' group anyway.)
_GENERAL = ("fonts-dejavu-core", "fonts-freefont-ttf", "fonts-noto-core", "fonts-croscore", "fonts-linuxlibertine")
_CJK = ("fonts-arphic-ukai", "fonts-arphic-uming", "fonts-baekmuk", "fonts-ipafont-gothic", "fonts-ipafont-mincho",
        "fonts-nanum", "fonts-noto-cjk", "fonts-unfonts-core", "fonts-wqy-microhei", "fonts-wqy-zenhei")
# The members of the fonts-thai-tlwg metapackage, named so they are the TrueType variants everywhere.
_TLWG = tuple(f"fonts-tlwg-{n}-ttf" for n in (
    "garuda", "kinnari", "laksaman", "loma", "mono", "norasi", "purisa", "sawasdee", "typewriter", "typist",
    "typo", "umpush", "waree"))

# Font licences, from each package's /usr/share/doc/<package>/copyright ("+FE": with font exception).
_OFL = "OFL-1.1"
LICENCES = {
    "culmus": "GPL-2+FE", "fonts-arabeyes": "GPL-2", "fonts-arphic-ukai": "Arphic-1999",
    "fonts-arphic-uming": "Arphic-1999", "fonts-baekmuk": "Baekmuk", "fonts-cantarell": _OFL, "fonts-cmu": _OFL,
    "fonts-comic-neue": _OFL, "fonts-croscore": _OFL, "fonts-dancingscript": _OFL,
    "fonts-dejavu-core": "Bitstream-Vera", "fonts-ebgaramond": _OFL, "fonts-farsiweb": "GPL-2",
    "fonts-freefont-ttf": "GPL-3+FE", "fonts-gargi": "GPL-2+", "fonts-gfs-artemisia": _OFL, "fonts-gfs-didot": _OFL,
    "fonts-hosny-amiri": _OFL, "fonts-ipafont-gothic": "IPA-1.0", "fonts-ipafont-mincho": "IPA-1.0",
    "fonts-kacst": "GPL-2", "fonts-linuxlibertine": "GPL-2+FE/OFL-1.1", "fonts-lohit-deva": _OFL,
    "fonts-nakula": "GPL-2+", "fonts-nanum": _OFL, "fonts-noto-cjk": _OFL, "fonts-noto-core": _OFL,
    "fonts-open-sans": "Apache-2.0", "fonts-paratype": "ParaType-Free-Font", "fonts-samyak-deva": "GPL-3+FE",
    "fonts-sarai": "GPL-2", "fonts-sil-ezra": _OFL, "fonts-sil-scheherazade": _OFL, "fonts-unfonts-core": "GPL-2",
    "fonts-urw-base35": "AGPL-3+FE", "fonts-wqy-microhei": "Apache-2.0/GPL-3+FE", "fonts-wqy-zenhei": "GPL-2+FE",
    **{p: "GPL-2+FE" for p in _TLWG},
}

_RUSSIAN = "АБВГДЕЁЖЗИЙКЛМНОПРСТУФХЦЧШЩЪЫЬЭЮЯ"


class FontSource(BuiltinSource):
    """Characters of one script rendered in the fonts of :attr:`packages` that draw all of them."""

    image_size = OUT
    channels = 1
    chars: str = ""
    packages: tuple[str, ...] = ()
    baseline: float = 0.3  # baseline below the canvas centre, in em (centres the script's glyphs)

    @property
    def origin(self) -> str:  # type: ignore[override]
        return f"{len(self.fonts())} fonts of Debian font packages (see licence), rendered with Pillow"

    @property
    def licence(self) -> str:  # type: ignore[override]
        used = self.packages_used()
        return "fonts: " + ", ".join(sorted({LICENCES[p] for p in used})) + " (rendered glyphs from Debian packages: " \
            + ", ".join(used) + ")"

    def check_available(self) -> None:
        missing = [p for p in self.packages if not fontscan.package_files(p)]
        if missing:
            raise SourceUnavailable(f"install the Debian font packages: apt-get install {' '.join(missing)}")
        fonts = self.fonts()
        n_test = sum(is_test for _, _, is_test in fonts)
        if n_test < 2 or len(fonts) - n_test < 2:
            raise SourceUnavailable(f"{self.name}: only {len(fonts)} usable fonts ({n_test} test)")

    def class_names(self) -> list[str]:
        return [f"{unicodedata.name(c).lower()} ({c})" for c in self.chars]

    def packages_used(self) -> list[str]:
        return sorted({face.package for face, _, _ in self.fonts()})

    @functools.cache  # noqa: B019 - sources live as long as the process
    def fonts(self) -> tuple[tuple[fontscan.Face, str, bool], ...]:
        """``(face, group, is_test)`` for every font used, sorted by path; split seeded by group."""
        canvas = OUT * SUPER
        kept = fontscan.usable_faces(self.chars, self.packages, self._size(), canvas, self.baseline)
        groups = sorted({g for _, g in kept})
        order = np.random.default_rng(self._seed()).permutation(len(groups))
        test_groups: set[str] = set()
        n_test_fonts = 0
        for i in order:
            if n_test_fonts >= max(2, TEST_FONT_FRACTION * len(kept)):
                break
            test_groups.add(groups[i])
            n_test_fonts += sum(g == groups[i] for _, g in kept)
        return tuple((face, g, g in test_groups) for face, g in kept)

    def augmentations(self) -> int:
        """``A``: renders per font and character."""
        return max(1, round(TARGET_PER_CLASS / max(1, len(self.fonts()))))

    def plan(self, start: int, end: int) -> list[ClassCounts]:
        self._check_range(start, end)
        a, fonts = self.augmentations(), self.fonts()
        n_test = sum(is_test for _, _, is_test in fonts)
        return [ClassCounts(train=a * (len(fonts) - n_test), test=a * n_test) for _ in range(start, end)]

    def load(self, start: int, end: int) -> LoadedImages:
        self._check_range(start, end)
        a, chars = self.augmentations(), self.chars[start:end]
        per_class: list[list[tuple[np.ndarray, str]]] = [[] for _ in chars]
        for face, _, is_test in self.fonts():  # fonts outer: each font file is opened once
            font = fontscan.pil_font(face, self._size())
            face_seed = zlib.crc32(f"{face.path}#{face.index}".encode())
            for i, ch in enumerate(chars):
                bases = {}
                for k in range(a):
                    rng = np.random.default_rng([self._seed(), face_seed, ord(ch), k])
                    stroke = int(rng.integers(0, 2))
                    if stroke not in bases:
                        bases[stroke] = self.draw(font, ch, stroke)
                    per_class[i].append((augment(bases[stroke], rng), TEST if is_test else TRAIN))
        images, labels, splits = [], [], []
        for label, items in enumerate(per_class):
            for img, split in items:
                images.append(img)
                labels.append(label)
                splits.append(split)
        return LoadedImages(images, labels, splits)

    def draw(self, font, ch: str, stroke: int) -> Image.Image:
        """The glyph, un-augmented, on the supersampled canvas (white on black)."""
        canvas = OUT * SUPER
        img = Image.new("L", (canvas, canvas), 0)
        origin = (canvas / 2, canvas / 2 + self.baseline * self._size())
        ImageDraw.Draw(img).text(origin, ch, fill=255, font=font, anchor="ms",
                                 stroke_width=stroke, stroke_fill=255)
        return img

    def _size(self) -> int:
        return round(FONT_SIZE * OUT * SUPER)

    def _seed(self) -> int:
        return zlib.crc32(self.name.encode())

    def _check_range(self, start: int, end: int) -> None:
        if not 0 <= start < end <= len(self.chars):
            raise ValueError(f"{self.name}: class range {start}..{end} outside 0..{len(self.chars)}")


def augment(base: Image.Image, rng: np.random.Generator) -> np.ndarray:
    """Seeded shift/rotation/scale about the canvas centre, then downsample to :data:`OUT` px."""
    size = base.size[0]
    angle = math.radians(rng.uniform(-10, 10))
    scale = rng.uniform(0.85, 1.15)
    tx, ty = rng.uniform(-2, 2, size=2) * SUPER
    c = size / 2
    # Image.transform wants the inverse map (output pixel -> input pixel).
    a, b = math.cos(angle) / scale, math.sin(angle) / scale
    d, e = -b, a
    ox, oy = c + tx, c + ty
    coeffs = (a, b, c - a * ox - b * oy, d, e, c - d * ox - e * oy)
    out = base.transform(base.size, Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR)
    return np.asarray(out.reduce(SUPER), dtype=np.uint8)


def _script(name: str, chars: str, packages: tuple[str, ...], description: str,
            **attrs) -> type[FontSource]:
    attrs.update(name=name, chars=chars, packages=tuple(sorted(set(packages))), description=description)
    return type(name.capitalize(), (FontSource,), attrs)


Latin = _script("latin", "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz", _EUROPEAN,
                "Latin letters A-Z then a-z, rendered from many fonts; test = unseen fonts")
Greek = _script("greek", "".join(chr(c) for c in range(0x391, 0x3AA) if c != 0x3A2)
                + "".join(chr(c) for c in range(0x3B1, 0x3CA) if c != 0x3C2),  # no final sigma
                _EUROPEAN, "Greek letters, upper then lower case (no final sigma)")
Cyrillic = _script("cyrillic", _RUSSIAN + _RUSSIAN.lower(), _EUROPEAN,
                   "Russian Cyrillic letters, upper then lower case (33 + 33)")
Hebrew = _script("hebrew", "אבגדהוזחטיכלמנסעפצקרשת" + "ךםןףץ", ("culmus", "fonts-sil-ezra", *_GENERAL),
                 "Hebrew: the 22 letters, then the 5 final forms")
Arabic = _script("arabic", "ابتثجحخدذرزسشصضطظعغفقكلمنهوي",
                 ("fonts-arabeyes", "fonts-farsiweb", "fonts-hosny-amiri", "fonts-kacst",
                  "fonts-sil-scheherazade", *_GENERAL),
                 "Arabic: the 28 letters, isolated forms", baseline=0.2)
Devanagari = _script("devanagari", "अआइईउऊऋएऐओऔ" + "कखगघङचछजझञटठडढणतथदधनपफबभमयरलवशषसह",
                     ("fonts-gargi", "fonts-lohit-deva", "fonts-nakula", "fonts-samyak-deva",
                      "fonts-sarai", *_GENERAL),
                     "Devanagari: 11 independent vowels, then 33 consonants", baseline=0.35)
# Common characters written the same in simplified, traditional and Japanese forms, so Chinese,
# Japanese and Korean (hanja) fonts all draw the same class.
Cjk = _script("cjk", "一二三四五六七八九十百千人大小中上下左右山川水火木金土日月天王子女口目手足耳田力"
              "心文生石竹米羊牛犬雨白立正本入出年工方先", _CJK,
              "60 very common Chinese characters (hanzi/kanji/hanja)", baseline=0.35)
Hangul = _script("hangul", "이다는의에하고을가서한지기로으사리도나대들자수시일어인정아부국해전상여게주장요보",
                 _CJK, "40 frequent Korean Hangul syllables", baseline=0.35)
Thai = _script("thai", "".join(chr(c) for c in range(0xE01, 0xE2F) if c not in (0xE24, 0xE26)),
               ("fonts-noto-core", "fonts-freefont-ttf", *_TLWG), "Thai: the 44 consonants")

SOURCES = (Latin, Greek, Cyrillic, Hebrew, Arabic, Devanagari, Cjk, Hangul, Thai)

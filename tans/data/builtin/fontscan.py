"""Find the installed font faces that really draw a script's characters.

The rendered-character sources (:mod:`tans.data.builtin.fonts`) need, per script, a fixed set of fonts
that cover the script. Which fonts exist must not depend on what else happens to be installed on a
machine, so only the files that dpkg lists for the source's Debian packages are considered (the
Makefile installs exactly those). A face is used for a script only if, for *every* character of
the script (so every class has the same fonts),

* the font's Unicode cmap maps the character to a real glyph (not glyph 0, ``.notdef``) and no
  other character of the script maps to the same glyph (a font that draws ``a`` with the ``A``
  glyph, or many characters with one fallback box, would make classes indistinguishable);
* FreeType says the glyph has ink (a non-empty bounding box) that fits the canvas.

Symbol-like and a few misbehaving fonts are excluded by name (:data:`EXCLUDED`).

The cmap is read with a few ``struct`` calls instead of fontTools: fontTools would also decode every
glyph name, which takes ~10 s for the ~800 installed faces; this takes well under a second. All
results are cached per process, so :meth:`plan` stays cheap.
"""

from __future__ import annotations

import bisect
import functools
import os
import re
import struct
from dataclasses import dataclass

from PIL import ImageFont

DPKG_INFO = "/var/lib/dpkg/info"

# Symbol, dingbat, emoji and notation fonts map letters to pictures or are not text faces at all.
# Also out: Linux Biolinum Keyboard (letters on key caps), Humor Sans (capitals for lower case),
# ae_Haramain draws each Arabic letter small inside an ornamental tile; KacstScreen and
# KacstDigital map Arabic code points to joining (not isolated) forms; KacstTitleL's hairlines
# vanish at 32 px.
EXCLUDED = re.compile(r"symbol|dingbat|emoji|icon|ornament|music|math|signwriting|d050000l|"
                      r"keyboard|humor|haramain|kacstscreen|kacstdigital|kacsttitlel",
                      re.IGNORECASE)

# Faces that are the same design under another name share one train/test group, so a test font
# is never a clone of a training font (Liberation 2 is built from Arimo/Tinos/Cousine; FreeFont's
# Latin comes from the URW Nimbus fonts).
CLONES = {"arimo": "liberation sans", "tinos": "liberation serif", "cousine": "liberation mono",
          "freesans": "nimbus sans", "freeserif": "nimbus roman", "freemono": "nimbus mono ps"}
MAX_FACES_PER_GROUP = 4  # keeps big families (CMU, Noto) from dominating a script's fonts

# Preferred cmap subtables, as fontTools' getBestCmap: full Unicode first, then the BMP.
_CMAP_PREFERENCE = ((3, 10), (0, 6), (0, 4), (3, 1), (0, 3), (0, 2), (0, 1), (0, 0))


@dataclass(frozen=True)
class Face:
    """One font face: a file (and the face index within a .ttc) and the package it comes from."""

    path: str
    index: int
    package: str


def package_files(package: str) -> list[str]:
    """Files dpkg installed for ``package`` ([] if it is not installed)."""
    for name in (f"{package}.list", f"{package}:all.list"):
        path = os.path.join(DPKG_INFO, name)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                return [line.rstrip("\n") for line in f]
    return []


@functools.cache
def all_faces(packages: tuple[str, ...]) -> tuple[Face, ...]:
    """Every TrueType/OpenType face of the Debian ``packages``, sorted by path.

    Only face 0 of a .ttc collection is used: the other faces of the installed collections are
    regional or monospaced variants that draw the same glyphs (near-duplicate fonts).
    """
    faces: dict[str, Face] = {}
    for package in packages:
        for path in package_files(package):
            if path.lower().endswith((".ttf", ".otf", ".ttc")) and os.path.isfile(path):
                real = os.path.realpath(path)
                if not EXCLUDED.search(os.path.basename(real)):
                    faces.setdefault(real, Face(real, 0, package))
    return tuple(faces[p] for p in sorted(faces))


def _cmap_table(path: str, index: int) -> bytes | None:
    """The raw ``cmap`` table of face ``index`` of a font file."""
    with open(path, "rb") as f:
        head = f.read(12)
        if head[:4] == b"ttcf":
            f.seek(12 + 4 * index)
            (offset,) = struct.unpack(">I", f.read(4))
            f.seek(offset)
            head = f.read(12)
        (num_tables,) = struct.unpack(">H", head[4:6])
        records = f.read(16 * num_tables)
        for i in range(num_tables):
            tag, _, offset, length = struct.unpack(">4sIII", records[16 * i:16 * i + 16])
            if tag == b"cmap":
                f.seek(offset)
                return f.read(length)
    return None


@functools.cache
def _cmap_lookup(path: str, index: int):
    """A function code point -> glyph id (0 if unmapped) from the best format 4/12 subtable."""
    table = _cmap_table(path, index)
    if not table:
        return lambda cp: 0
    _, n = struct.unpack(">HH", table[:4])
    subtables: dict[tuple[int, int], int] = {}
    for i in range(n):
        pid, eid, offset = struct.unpack(">HHI", table[4 + 8 * i:12 + 8 * i])
        subtables.setdefault((pid, eid), offset)
    for key in _CMAP_PREFERENCE:
        offset = subtables.get(key)
        if offset is None:
            continue
        (fmt,) = struct.unpack(">H", table[offset:offset + 2])
        if fmt == 4:
            return _format4(table, offset)
        if fmt == 12:
            return _format12(table, offset)
    return lambda cp: 0


def _format4(t: bytes, o: int):
    seg = struct.unpack(">H", t[o + 6:o + 8])[0] // 2
    ends = struct.unpack(f">{seg}H", t[o + 14:o + 14 + 2 * seg])
    starts = struct.unpack(f">{seg}H", t[o + 16 + 2 * seg:o + 16 + 4 * seg])
    deltas = struct.unpack(f">{seg}h", t[o + 16 + 4 * seg:o + 16 + 6 * seg])
    ro_at = o + 16 + 6 * seg
    range_offsets = struct.unpack(f">{seg}H", t[ro_at:ro_at + 2 * seg])

    def lookup(cp: int) -> int:
        i = bisect.bisect_left(ends, cp)
        if i == seg or starts[i] > cp:
            return 0
        if range_offsets[i] == 0:
            return (cp + deltas[i]) & 0xFFFF
        at = ro_at + 2 * i + range_offsets[i] + 2 * (cp - starts[i])
        (gid,) = struct.unpack(">H", t[at:at + 2])
        return (gid + deltas[i]) & 0xFFFF if gid else 0

    return lookup


def _format12(t: bytes, o: int):
    (n,) = struct.unpack(">I", t[o + 12:o + 16])
    groups = struct.unpack(f">{3 * n}I", t[o + 16:o + 16 + 12 * n])
    starts, ends, first = groups[0::3], groups[1::3], groups[2::3]

    def lookup(cp: int) -> int:
        i = bisect.bisect_left(ends, cp)
        return first[i] + cp - starts[i] if i < n and starts[i] <= cp else 0

    return lookup


def glyph_ids(face: Face, chars: str) -> list[int]:
    """Glyph id of every character in the face's cmap (0 = not covered)."""
    lookup = _cmap_lookup(face.path, face.index)
    return [lookup(ord(c)) for c in chars]


def pil_font(face: Face, size: int) -> ImageFont.FreeTypeFont:
    """The face as a Pillow font with basic layout: a lone character draws its cmap glyph (for
    Arabic the isolated form), the same whether or not Pillow has libraqm. (Shaping with raqm was
    tried: it changed the isolated glyph of 4 of 75 Arabic fonts, only for heh.)"""
    return ImageFont.truetype(face.path, size, index=face.index,
                              layout_engine=ImageFont.Layout.BASIC)


def group_key(face: Face, font: ImageFont.FreeTypeFont) -> str:
    """The train/test group of a face: its family name without size/width words, clones merged."""
    family = (font.getname()[0] or os.path.basename(face.path)).lower()
    family = re.sub(r"\b(\d+|condensed|narrow|light|medium|semibold|bold|black|thin|book)\b",
                    "", family)
    family = " ".join(family.split())
    return CLONES.get(family, family)


@functools.cache
def usable_faces(chars: str, packages: tuple[str, ...], size: int, canvas: int,
                 baseline: float) -> tuple[tuple[Face, str], ...]:
    """``(face, group)`` of the faces of ``packages`` that draw every one of ``chars``.

    "Draws" is in the module docstring's sense; the ink must also fit the square ``canvas`` when
    drawn at ``size`` px on a baseline ``baseline`` em below the centre. Of each group at most
    :data:`MAX_FACES_PER_GROUP` faces (the first by path) are kept. Sorted by path.
    """
    kept: list[tuple[Face, str]] = []
    per_group: dict[str, int] = {}
    half = 0.47 * canvas  # a small margin left for the augmentations
    for face in all_faces(packages):
        gids = glyph_ids(face, chars)
        if 0 in gids or len(set(gids)) < len(gids):
            continue
        font = pil_font(face, size)
        if EXCLUDED.search(font.getname()[0] or ""):
            continue
        for ch in chars:
            # y: the ink; x: the advance (Pillow reports the advance box horizontally).
            x0, y0, x1, y1 = font.getbbox(ch, anchor="ms")
            y0, y1 = y0 + baseline * size, y1 + baseline * size
            if not (y1 > y0 and max(abs(x0), abs(x1), abs(y0), abs(y1)) <= half):
                break
        else:
            group = group_key(face, font)
            if per_group.get(group, 0) < MAX_FACES_PER_GROUP:
                per_group[group] = per_group.get(group, 0) + 1
                kept.append((face, group))
    return tuple(kept)

"""The built-in offline sources: available, consistent (plan == load), deterministic, sane images.

Loads the first task of every source (twice) and renders every character of every font source
once without augmentation; about a minute on two cores.
"""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pytest

from tans.data.builtin import fontscan
from tans.data.builtin.base import TEST, TRAIN
from tans.data.builtin.fonts import FontSource
from tans.data.builtin.registry import all_sources

SOURCES = all_sources()
FONT_SOURCES = [n for n, s in SOURCES.items() if isinstance(s, FontSource)]
PACKAGE_LIST = Path(__file__).parents[4] / "tans" / "data" / "builtin" / "debian_packages.txt"


@pytest.fixture(scope="module")
def first_tasks():
    """Each source's first task, loaded once (shared by the checks below)."""
    cache = {}

    def get(name):
        if name not in cache:
            src = SOURCES[name]
            start, end = src.task_ranges()[0]
            cache[name] = (start, end, src.load(start, end))
        return cache[name]

    return get


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(SOURCES))
def test_source_metadata(name):
    src = SOURCES[name]
    src.check_available()
    assert src.name == name and name.isalpha() and name.islower()
    assert src.description and src.licence and src.origin and src.channels in (1, 3)
    names = src.class_names()
    assert len(names) == len(set(names)) >= 10
    ranges = src.task_ranges()
    assert len(ranges) >= 2 and ranges[0][0] == 0 and ranges[-1][1] == len(names)
    assert all(a < b for a, b in ranges) and all(b == c for (_, b), (c, _) in zip(ranges, ranges[1:]))
    for start, end in ranges:
        counts = src.plan(start, end)
        assert end - start >= 5 and len(counts) == end - start
        assert all(c.train >= 20 and c.test >= 5 for c in counts), (start, end, counts)
        if name == "cyrillic":  # the held-out meta-test source needs sizeable test sets
            assert sum(c.test for c in counts) >= 500


@pytest.mark.timeout(300)
def test_corpus_shape():
    tasks = {n: len(s.task_ranges()) for n, s in SOURCES.items()}
    total = sum(tasks.values())
    assert list(SOURCES) == sorted(SOURCES)
    assert total >= 40 and len(tasks) >= 6
    assert all(2 <= t <= total / 2 for t in tasks.values()), tasks


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(SOURCES))
def test_first_task_matches_plan_and_is_deterministic(name, first_tasks):
    src = SOURCES[name]
    start, end, loaded = first_tasks(name)
    n = end - start
    assert len(loaded.images) == len(loaded.labels) == len(loaded.splits)
    labels, splits = np.asarray(loaded.labels), np.asarray(loaded.splits)
    assert sorted(set(labels.tolist())) == list(range(n))
    assert set(splits.tolist()) <= {TRAIN, TEST}
    for i, c in enumerate(src.plan(start, end)):
        assert (c.train, c.test) == (int(np.sum((labels == i) & (splits == TRAIN))),
                                     int(np.sum((labels == i) & (splits == TEST)))), i
    shape = (src.image_size, src.image_size) + ((3,) if src.channels == 3 else ())
    assert all(im.shape == shape and im.dtype == np.uint8 for im in loaded.images)
    again = src.load(start, end)
    assert again.labels == loaded.labels and again.splits == loaded.splits
    assert all(np.array_equal(a, b) for a, b in zip(loaded.images, again.images))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", FONT_SOURCES)
def test_font_images_not_blank(name, first_tasks):
    _, _, loaded = first_tasks(name)
    blank = [i for i, im in enumerate(loaded.images) if np.count_nonzero(im > 64) < 3]
    assert not blank, f"{len(blank)} blank images, first {blank[:5]}"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", FONT_SOURCES)
def test_font_classes_render_differently(name):
    """In every font, the characters of one task never draw the same picture (a .notdef box or a
    shared fallback glyph would)."""
    src = SOURCES[name]
    for face, _, _ in src.fonts():
        font = fontscan.pil_font(face, src._size())
        for start, end in src.task_ranges():
            seen = {}
            for ch in src.chars[start:end]:
                key = np.asarray(src.draw(font, ch, 0)).tobytes()
                assert key not in seen, f"{face.path}: {seen.get(key)!r} and {ch!r} render identically"
                seen[key] = ch


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", FONT_SOURCES)
def test_font_split(name):
    """Test fonts are a seeded ~25% of the fonts, at least 2, and whole groups (no clone leaks)."""
    fonts = SOURCES[name].fonts()
    test_groups = {g for _, g, is_test in fonts if is_test}
    train_groups = {g for _, g, is_test in fonts if not is_test}
    n_test = sum(is_test for _, _, is_test in fonts)
    assert not test_groups & train_groups
    assert n_test >= 2 and 0.2 <= n_test / len(fonts) <= 0.45
    per_group = collections.Counter(g for _, g, _ in fonts)
    assert max(per_group.values()) <= fontscan.MAX_FACES_PER_GROUP


@pytest.mark.timeout(300)
def test_debian_package_list_is_exactly_what_is_used():
    listed = {line.split("#")[0].strip() for line in PACKAGE_LIST.read_text().splitlines()} - {""}
    used = {"dataset-fashion-mnist", "openclipart-png"}
    for name in FONT_SOURCES:
        src = SOURCES[name]
        assert set(src.packages) <= listed, set(src.packages) - listed
        used |= set(src.packages_used())
    assert listed == used, (listed - used, used - listed)

"""`tans search --dataset SRC`: an ImageFolder a user brings becomes a task once, then splits."""

from __future__ import annotations

import pytest

from tans.selection.search import SearchError, load_search_data, prepare_dataset
from tans.storage import Storage
from tests.conftest import make_imagefolder


def test_an_imagefolder_is_ingested_once_and_split_without_overlap(tmp_path):
    storage = Storage(str(tmp_path / "root"))
    folder = make_imagefolder(tmp_path / "user" / "my_parts", {"bolt": 12, "nut": 10, "washer": 11})
    task, how = prepare_dataset(storage, str(folder), image_size=16)
    assert (task, how) == ("my_parts", "ingested from an ImageFolder")
    assert prepare_dataset(storage, str(folder), image_size=16) == ("my_parts", "ingested earlier")
    assert prepare_dataset(storage, "my_parts", image_size=16) == ("my_parts", "in the storage root")

    data = load_search_data(storage, task, image_size=16, val_fraction=0.25, seed=0)
    assert data.classes == ["bolt", "nut", "washer"]
    n_train, n_val, n_test = len(data.train), len(data.val), len(data.test)
    assert n_train + n_val + n_test == 33 and min(n_train, n_val, n_test) > 0
    # every split sees every class (the folder's classes have distinct mean colours)
    for split in (data.train, data.val, data.test):
        images, labels = split.images.float(), split.labels
        assert set(labels.tolist()) == {0, 1, 2}
        means = [float(images[labels == c].mean()) for c in range(3)]
        assert means == sorted(means)
    # the val split is carved from train: no image is in both
    train_rows = {tuple(x.flatten().tolist()) for x in data.train.images}
    assert not any(tuple(x.flatten().tolist()) in train_rows for x in data.val.images)


def test_another_folder_with_the_same_name_is_refused(tmp_path):
    storage = Storage(str(tmp_path / "root"))
    prepare_dataset(storage, str(make_imagefolder(tmp_path / "a" / "shapes", {"x": 6, "y": 6})), image_size=16)
    other = make_imagefolder(tmp_path / "b" / "shapes", {"x": 6, "y": 6}, seed=1)
    with pytest.raises(SearchError, match="another source"):
        prepare_dataset(storage, str(other), image_size=16)


@pytest.mark.parametrize("src, needle", [("", "--dataset is required"), ("/no/such/folder", "/no/such/folder"),
                                         ("not_a_task", "no task 'not_a_task'")])
def test_bad_sources_are_search_errors(tmp_path, src, needle):
    storage = Storage(str(tmp_path / "root"))
    with pytest.raises(SearchError, match=needle):
        prepare_dataset(storage, src, image_size=16)
    assert not storage.exists("tasks")


def test_unreadable_files_are_named_in_how_the_dataset_got_there(tmp_path):
    storage = Storage(str(tmp_path / "root"))
    folder = make_imagefolder(tmp_path / "user" / "parts", {"bolt": 8, "nut": 8})
    (folder / "nut" / "broken.png").write_bytes(b"not an image")
    task, how = prepare_dataset(storage, str(folder), image_size=16)
    assert task == "parts"
    assert how.startswith("ingested from an ImageFolder, skipping 1 unreadable file(s): ")
    assert how.endswith("nut/broken.png")
    data = load_search_data(storage, task, image_size=16, val_fraction=0.25, seed=0)
    assert len(data.train) + len(data.val) + len(data.test) == 16  # the 16 readable images, not 17


def test_a_class_too_small_for_every_split_is_reported_missing_from_the_others(tmp_path):
    storage = Storage(str(tmp_path / "root"))
    folder = make_imagefolder(tmp_path / "user" / "lopsided", {"many": 40, "one": 1})
    task, _ = prepare_dataset(storage, str(folder), image_size=16)
    data = load_search_data(storage, task, image_size=16, val_fraction=0.2, seed=0)
    missing = data.classes_missing()
    # its single image is in exactly one of train / val / test
    assert sum("one" in missing.get(split, []) for split in ("train", "val", "test")) == 2
    assert all("many" not in classes for classes in missing.values())
    balanced = load_search_data(storage, prepare_dataset(storage, str(make_imagefolder(
        tmp_path / "user" / "even", {"x": 12, "y": 12})), image_size=16)[0], image_size=16, val_fraction=0.25, seed=0)
    assert balanced.classes_missing() == {}


def test_finetune_list_gives_the_last_slot_to_the_nearest_datasets_model():
    from tans.selection.search import finetune_list

    retrieved = ["a", "b", "c", "d", "e"]
    assert finetune_list(retrieved, "x", 4) == ["a", "b", "c", "x"]  # not retrieved: takes the last slot
    assert finetune_list(retrieved, "d", 4) == ["a", "b", "c", "d"]  # the 4th already: nothing changes
    assert finetune_list(retrieved, "b", 4) == ["a", "b", "c", "d"]  # among the first 3: the 4th stays
    assert finetune_list(retrieved, "e", 4) == ["a", "b", "c", "e"]  # retrieved, but 5th: takes the slot
    assert finetune_list(retrieved, None, 4) == ["a", "b", "c", "d"]  # switched off
    assert finetune_list(retrieved, "x", 1) == ["a"]  # one slot stays the retrieval's
    assert finetune_list(["a", "b"], "x", 4) == ["a", "b", "x"]  # fewer retrieved than slots: a free one

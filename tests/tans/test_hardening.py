"""Names, the root guard, build-beside-then-swap and corrupt artifacts: nothing a user gives may
destroy or poison the storage root, and a damaged file is one line naming it and its rebuild."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from tans.config import ConfigError
from tans.data.tasks import TaskError, TaskInfo, check_task_name, read_split, read_task_info, write_task
from tans.job_configs import load_job_config
from tans.names import check_name, is_valid_name
from tans.space.features import ExtractorSpec
from tans.space.store import files_dir, finish_space, index_table, load_space, new_generation, save_model_state
from tans.space.training import SpaceModel, ZooArrays, index_embeddings
from tans.storage import CorruptArtifact, Storage, StorageError
from tans.zoo.store import ZooManifest, part_path, read_zoo, readable_part, write_manifest
from tans.zoo.supernets import get_family
from tests.conftest import REPO, run_cli, tree_digest
from tests.tans.space.test_features_and_space_io import _toy_zoo

# Every bad name the tests try; the fault-suite summary counts them (tests/test_fault_summary.py).
BAD_NAMES = ["..", ".", "../x", "a/b", "a\\b", "x\n", "\nx", "", " a", "-a", ".hidden", "a..b", "a b", "a;rm",
             "é", "x" * 129, "a\x00b"]
GOOD_NAMES = ["a", "local", "local2-ofa_mbv3_w1.0-48px", "cyrillic_0_9", "A.b-c_d", "x" * 128]


def test_one_name_rule(ledger):
    ledger.bad_input(2 * len(BAD_NAMES))
    for name in GOOD_NAMES:
        assert is_valid_name(name) and check_name(name) == name and check_task_name(name) == name
    for name in BAD_NAMES:
        assert not is_valid_name(name), repr(name)
        with pytest.raises(ValueError, match="not a valid name"):
            check_name(name, "name")
        with pytest.raises(TaskError, match="invalid task name"):
            check_task_name(name)


@pytest.mark.parametrize("job,key", [("space", "name"), ("space", "zoo"), ("space", "extractor.name"),
                                     ("zoo", "name"), ("search", "name"), ("search", "space"),
                                     ("evaluate", "name"), ("evaluate", "space")])
@pytest.mark.parametrize("bad", ["..", "x\n", "a..b", ".hidden"])
def test_every_job_config_refuses_a_bad_name(job, key, bad, ledger):
    ledger.bad_input()
    with pytest.raises(ConfigError, match=key.split(".")[-1]):
        load_job_config(job, f"configs/{job}/local.yaml", [f"{key}={json.dumps(bad)}"])


def test_splits_refuse_a_bad_task_name(tmp_path, ledger):
    ledger.bad_input()
    path = tmp_path / "splits.yaml"
    path.write_text('meta_train: [a, "b\\n"]\n')
    with pytest.raises(ConfigError, match="meta_train task"):
        load_job_config("splits", path)


def _small_root(root: Path) -> Storage:
    st = Storage(str(root))
    st.write_json("tasks/t1/task.json", {"name": "t1"})
    st.write_bytes("tasks/t1/train/part-00000.parquet", b"not really parquet")
    st.write_text("spaces/LATEST", "local\n")
    st.write_json("spaces/local/space.json", {"run": "local"})
    st.write_json("zoo/z/zoo.json", {"name": "z"})
    return st


@pytest.mark.timeout(120)
def test_train_space_dotdot_is_refused_before_torch_or_ray_and_the_root_is_untouched(tmp_path, ledger):
    ledger.bad_input(2)
    root = tmp_path / "copy"
    _small_root(root)
    before = tree_digest(root)
    code = ("import sys\nfrom jobs._common import run_main\nfrom jobs.cli import main\n"
            f"rc = main(['train-space', '--config', 'configs/space/local.yaml', 'root={root}', 'name=..', "
            "'force=true'])\n"
            "print('RESULT', rc, 'torch' in sys.modules, 'ray' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert result == ["RESULT 2 False False"], (proc.stdout, proc.stderr)
    errors = proc.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error:") and "'..'" in errors[0], proc.stderr
    ledger.intact(before, tree_digest(root))
    assert tree_digest(root) == before

    # and as a user types it: exit 2, one line, nothing changed
    proc = run_cli("train-space", "--config", "configs/space/local.yaml", f"root={root}", "name=..", "force=true")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    ledger.intact(before, tree_digest(root))
    assert tree_digest(root) == before


@pytest.mark.parametrize("rel", ["", ".", "/", "spaces/..", "a/b/../..", "tasks/../"])
def test_storage_never_deletes_or_overwrites_the_root(tmp_path, rel, ledger):
    ledger.bad_input(5)
    root = tmp_path / "r"
    st = _small_root(root)
    before = tree_digest(root)
    with pytest.raises(StorageError, match="storage root"):
        st.delete(rel)
    with pytest.raises(StorageError, match="storage root"):
        st.write_bytes(rel, b"x")
    for escape in ("..", "../x", "a/../../x"):
        with pytest.raises(StorageError, match="escapes"):
            st.delete(escape)
    ledger.intact(before, tree_digest(root))


def _task(name: str, value: int, n: int = 6) -> tuple[TaskInfo, dict, dict]:
    from tans.data.tasks import encode_png

    img = encode_png(np.full((8, 8), value, dtype=np.uint8))
    info = TaskInfo(name=name, classes=["a", "b"], source="test", licence="none", image_size=8, channels=1, counts={})
    return info, {"train": [img] * n, "test": [img] * 2}, {"train": [0, 1] * (n // 2), "test": [0, 1]}


def test_task_force_builds_beside_then_swaps(tmp_path, monkeypatch, ledger):
    st = Storage(str(tmp_path))
    write_task(st, *_task("t", 10), part_rows=4)
    before = tree_digest(tmp_path)
    ledger.bad_input()
    with pytest.raises(TaskError, match="already exists"):
        write_task(st, *_task("t", 20))

    # a crash while the replacement is written (here: at its commit marker) leaves the old task whole
    real = st.write_json

    def crash_on_marker(rel, obj):
        if rel.endswith("task.json"):
            raise KeyboardInterrupt("killed")
        return real(rel, obj)

    monkeypatch.setattr(st, "write_json", crash_on_marker)
    with pytest.raises(KeyboardInterrupt):
        write_task(st, *_task("t", 20, n=8), part_rows=4, force=True)
    ledger.fault()
    ledger.intact(before, tree_digest(tmp_path))
    monkeypatch.setattr(st, "write_json", real)
    old = read_split(st, "t", "train")
    assert old.num_rows == 6 and read_task_info(st, "t").counts["train"] == 6
    assert len(st.list("tasks/t/train")) > len(read_task_info(st, "t").parts["train"])  # the new parts sit beside

    info = write_task(st, *_task("t", 20, n=8), part_rows=4, force=True)
    assert read_split(st, "t", "train").num_rows == 8
    kept = sorted(p.rsplit("/", 1)[-1] for p in st.list("tasks/t/train"))
    assert kept == sorted(info.parts["train"])  # the old generation and the crashed one are gone


def _toy_space(st: Storage, run: str, seed: int, files: str = "") -> tuple[SpaceModel, dict]:
    family = get_family("ofa_mbv3_tiny")
    torch.manual_seed(seed)
    model = SpaceModel(family, feature_dim=16, embed_dim=8, hidden=16, predictor_hidden=8).eval()
    table = _toy_zoo(f_dim=448, seed=seed)
    save_model_state(st, run, model.state_dict(), files)
    st.write_parquet(f"{files_dir(run, files)}/index.parquet",
                     index_table(table, index_embeddings(model, ZooArrays.from_table(table))))
    st.write_json(f"{files_dir(run, files)}/metrics.json", {"val": {}})
    info = {"run": run, "zoo": "toy", "family": "ofa_mbv3_tiny", "image_size": 32, "feature_dim": 16,
            "extractor": ExtractorSpec(kind="supernet", uri="", family="ofa_mbv3_tiny", image_size=32).to_dict(),
            "architecture": {"embed_dim": 8, "hidden": 16, "attention": False, "predictor_hidden": 8},
            "files": files}
    return model, info


def _answer(uri: str) -> list[str]:
    x = torch.randn(20, 16, generator=torch.Generator().manual_seed(1))
    return [c.model_id for c in load_space(uri).retrieve(x, torch.arange(4).repeat(5), k=12).candidates]


def test_space_force_builds_a_generation_beside_then_swaps(tmp_path, ledger):
    st = Storage(str(tmp_path))
    _, info = _toy_space(st, "run1", seed=0)
    finish_space(st, "run1", info)
    first = _answer(str(tmp_path))

    # a forced rebuild writes a generation beside the finished run; until its space.json lands,
    # the old space (and LATEST) answer exactly as before
    before = tree_digest(tmp_path)
    gen = new_generation()
    _, new_info = _toy_space(st, "run1", seed=5, files=gen)  # ... and the process dies here
    ledger.fault()
    ledger.intact(before, tree_digest(tmp_path))
    assert _answer(str(tmp_path)) == first and st.read_bytes("spaces/LATEST").decode().strip() == "run1"
    finish_space(st, "run1", new_info)
    second = _answer(str(tmp_path))
    assert second != first
    listing = {p.rsplit("/", 1)[-1] for p in st.list("spaces/run1")}
    assert listing == {"space.json", gen}  # the old top-level files are gone after the swap
    assert st.is_file(f"spaces/run1/{gen}/model.pt")

    # and once more: the next generation replaces this one
    gen2 = new_generation()
    _, info3 = _toy_space(st, "run1", seed=9, files=gen2)
    finish_space(st, "run1", info3)
    assert {p.rsplit("/", 1)[-1] for p in st.list("spaces/run1")} == {"space.json", gen2}


def test_corrupt_space_files_are_one_line_naming_the_file_and_the_rebuild(tmp_path, ledger):
    ledger.fault(6)
    st = Storage(str(tmp_path))
    _, info = _toy_space(st, "run1", seed=0)
    finish_space(st, "run1", info)
    model_pt = tmp_path / "spaces" / "run1" / "model.pt"
    good = model_pt.read_bytes()
    for damage in (good[: len(good) // 2], b"garbage", b""):
        model_pt.write_bytes(damage)
        with pytest.raises(CorruptArtifact) as err:
            load_space(str(tmp_path))
        msg = str(err.value)
        assert "\n" not in msg and str(model_pt) in msg and "tans train-space" in msg and "--force" in msg
    model_pt.write_bytes(good)

    index = tmp_path / "spaces" / "run1" / "index.parquet"
    index.write_bytes(index.read_bytes()[:100])
    with pytest.raises(CorruptArtifact, match="index.parquet.*train-space"):
        load_space(str(tmp_path))

    (tmp_path / "spaces" / "run1" / "space.json").write_text('{"run": "run1", "zo')
    with pytest.raises(CorruptArtifact, match="space.json.*not valid JSON"):
        load_space(str(tmp_path))


def _toy_zoo_on(st: Storage, name: str = "z") -> pa.Table:
    table = _toy_zoo(f_dim=448)
    tasks = sorted(set(table.column("task").to_pylist()))
    for t in tasks:
        st.write_parquet(part_path(name, t), table.filter(pa.compute.equal(table.column("task"), t)))
    write_manifest(st, ZooManifest(name, "ofa_mbv3_tiny", 32, "h", tasks, table.num_rows))
    return table


@pytest.mark.timeout(120)
def test_corrupt_zoo_and_task_files_end_in_one_line(tmp_path, ledger):
    ledger.fault(3)
    st = Storage(str(tmp_path))
    table = _toy_zoo_on(st)
    assert read_zoo(st, "z").num_rows == table.num_rows
    part = tmp_path / "zoo" / "z" / "part-t1.parquet"
    part.write_bytes(part.read_bytes()[:-40])
    assert readable_part(st, "z", "t0") and not readable_part(st, "z", "t1")  # build-zoo redoes t1
    proc = run_cli("zoo", "stats", "--root", str(tmp_path), "--zoo", "z")
    errors = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(errors) == 1 and "part-t1.parquet" in errors[0], proc.stderr
    assert "tans build-zoo" in errors[0] and "Traceback" not in proc.stderr

    (tmp_path / "zoo" / "z" / "zoo.json").write_bytes(b"\x00\xff")
    proc = run_cli("zoo", "stats", "--root", str(tmp_path), "--zoo", "z")
    assert proc.returncode == 1 and "zoo.json" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1

    write_task(st, *_task("t", 10))
    task_part = next((tmp_path / "tasks" / "t" / "train").glob("*.parquet"))
    task_part.write_bytes(b"PAR1 garbage")
    with pytest.raises(CorruptArtifact, match="tans data ingest"):
        read_split(st, "t", "train")


def test_a_space_refuses_an_extractor_that_changed_since_it_was_trained(tmp_path, ledger):
    ledger.fault(2)
    from tans.space.features import ExtractorError, build_extractor, checkpoint_sha256

    family = get_family("ofa_mbv3_tiny")
    ckpt = tmp_path / "base.pt"
    torch.save(family.build(7).state_dict(), ckpt)
    spec = ExtractorSpec(kind="supernet", uri=str(ckpt), family="ofa_mbv3_tiny", image_size=32,
                         sha256=checkpoint_sha256(str(ckpt)))
    assert build_extractor(spec).feature_dim == family.penultimate_dim
    assert ExtractorSpec.from_dict(spec.to_dict()).sha256 == spec.sha256  # it travels in space.json

    torch.manual_seed(1)
    torch.save(family.build(7).state_dict(), ckpt)  # e.g. `build-zoo --force` re-pretrained the base
    with pytest.raises(ExtractorError, match="changed since the space was trained.*train-space"):
        build_extractor(spec)
    ckpt.unlink()
    with pytest.raises(ExtractorError, match="extractor is gone.*train-space"):
        build_extractor(spec)


def test_predict_skips_an_image_over_the_pixel_bound_without_decoding_it(ledger):
    ledger.bad_input()
    from jobs.predict import decode
    from tests.tans.data.test_ingest import _bomb_png

    class NeverDecode:
        def preprocess(self, img):
            raise AssertionError("an image over the bound reached preprocessing")

    assert decode(_bomb_png(12000), NeverDecode()) is None


def test_a_damaged_query_file_is_one_line_and_extracted_again(tmp_path, ledger):
    from jobs.extract_queries import _readable_query
    from tans.space.features import query_path, read_query, write_query

    st = Storage(str(tmp_path))
    write_query(st, "ex", "t", np.ones((4, 3), dtype=np.float32), np.arange(4))
    assert _readable_query(st, "ex", "t") and read_query(st, "ex", "t")[0].shape == (4, 3)
    path = tmp_path / query_path("ex", "t")
    path.write_bytes(path.read_bytes()[:-30])
    ledger.fault()
    with pytest.raises(CorruptArtifact, match="queries.force=true"):
        read_query(st, "ex", "t")
    assert not _readable_query(st, "ex", "t")  # train-space extracts it again instead of failing


def test_only_config_keys_are_overrides_and_flag_values_stay_strings(ledger):
    from jobs import evaluate, search
    from jobs._common import as_override, split_overrides

    ledger.bad_input(4)
    args = search.parse_args(["--dataset", "s3://b/year=2024/", "epochs=3", "--name", "on", "--force",
                              "finetune.x=1", "top_k=6"])
    # `finetune.x=1` is shaped like an override: it stays one, and the config load names the bad key
    assert [o for o in args.overrides if o.startswith(("epochs", "top_k", "finetune."))] == \
        ["epochs=3", "finetune.x=1", "top_k=6"]
    args.overrides.remove("finetune.x=1")
    cfg = load_job_config("search", "configs/search/local.yaml", args.overrides)
    assert cfg.dataset == "s3://b/year=2024/" and cfg.name == "on" and cfg.epochs == 3 and cfg.force
    assert split_overrides(["/data/a=b", "x.y=1", "--flag"]) == (["x.y=1"], ["/data/a=b", "--flag"])
    assert as_override("root", "/data/#1") == 'root="/data/#1"' and as_override("epochs", 3) == "epochs=3"

    ev = evaluate.parse_args(["--dataset", "/data/it's", "--dataset", "s3://b/k=v", "--name", "null"])
    cfg = load_job_config("evaluate", "configs/evaluate/local.yaml", ev.overrides)
    assert cfg.datasets == ["/data/it's", "s3://b/k=v"] and cfg.name == "null"

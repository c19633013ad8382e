"""Base supernet pretraining on Ray Train: DDP averaging, resume after a worker failure, reuse."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tans.data.ingest import ingest_imagefolder
from tans.data.reader import load_task_tensors, to_float
from tans.job_configs import PretrainConfig, ZooConfig
from tans.storage import Storage
from tans.zoo.supernets import SupernetError, get_family
from tests.conftest import REPO, make_imagefolder

FAMILY, SIZE = "ofa_mbv3_tiny", 32

# Train workers cannot import a test module (pytest imports it by file name): ship its functions.
import ray.cloudpickle  # noqa: E402

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Storage, Path]:
    """A storage root with two tiny tasks (3 and 2 classes) and a splits file naming them."""
    base = tmp_path_factory.mktemp("pretrain")
    st = Storage(str(base / "root"))
    for name, classes, seed in (("shapes_0_3", {"a": 30, "b": 30, "c": 30}, 0), ("marks_0_2", {"x": 30, "y": 30}, 1)):
        src = make_imagefolder(base / name, classes, size=20, seed=seed)
        ingest_imagefolder(st, str(src), name, image_size=SIZE)
    splits = base / "splits.yaml"
    splits.write_text("meta_train: [shapes_0_3, marks_0_2]\nmeta_val: []\nmeta_test: [held_out_0_2]\n")
    return st, splits


def zoo_config(st: Storage, splits: Path, name: str, **pretrain) -> ZooConfig:
    p = PretrainConfig(epochs=3, images_per_task=48, batch_size=16, lr=0.05, num_workers=2, cpus_per_worker=1,
                       max_failures=2)
    for k, v in pretrain.items():
        setattr(p, k, v)
    return ZooConfig(name=name, root=st.uri, family=FAMILY, image_size=SIZE, splits=str(splits), pretrain=p)


# -- (a) DDP averages gradients -------------------------------------------------------------


def _one_ddp_step(config: dict) -> None:
    """Each rank: same init, its own batch, one plain SGD step through the job's DDP wrapper."""
    import ray.train

    from jobs.pretrain_supernet import prepare_ddp
    from tans.zoo.supernets import unwrap

    rank = ray.train.get_context().get_world_rank()
    model = get_family(FAMILY).build(config["num_classes"])
    model.load_state_dict(torch.load(config["init"], weights_only=True))
    model = prepare_ddp(model)
    # Eval-mode BN (running statistics): a sample's loss does not depend on the rest of its
    # batch, so two half batches averaged must equal one process on the whole batch.
    model.eval()
    images, labels = torch.load(config["batches"], weights_only=True)[rank]
    optimizer = torch.optim.SGD(model.parameters(), lr=config["lr"])
    optimizer.zero_grad()
    F.cross_entropy(model(images), labels).backward()
    optimizer.step()
    torch.save(unwrap(model).state_dict(), os.path.join(config["out"], f"rank{rank}.pt"))
    ray.train.report({"rank": rank})


def _plain_step(init: dict, images, labels, lr: float, num_classes: int) -> dict:
    model = get_family(FAMILY).build(num_classes)
    model.load_state_dict(init)
    model.eval()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    F.cross_entropy(model(images), labels).backward()
    optimizer.step()
    return model.state_dict()


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].is_floating_point())


@pytest.mark.timeout(240)
def test_ddp_averages_gradients_across_two_workers(ray_local, corpus, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    st, _ = corpus
    data = load_task_tensors(st, "shapes_0_3", "train", SIZE)
    torch.manual_seed(0)
    model = get_family(FAMILY).build(data.num_classes)
    with torch.no_grad():  # real BN running statistics, so eval-mode activations are well scaled
        model.train()
        model(to_float(data.images[:64]))
    init = model.state_dict()
    torch.save(init, tmp_path / "init.pt")
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(1))
    batches = [(to_float(data.images[idx]), data.labels[idx]) for idx in (perm[:12], perm[12:24])]
    torch.save(batches, tmp_path / "batches.pt")
    lr = 0.5

    trainer = TorchTrainer(
        _one_ddp_step,
        train_loop_config={"init": str(tmp_path / "init.pt"), "batches": str(tmp_path / "batches.pt"),
                           "out": str(tmp_path), "lr": lr, "num_classes": data.num_classes},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
        torch_config=TorchConfig(backend="gloo"),
        run_config=RunConfig(name="ddp", storage_path=str(tmp_path / "ray")),
    )
    trainer.fit()
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    combined = _plain_step(init, torch.cat([batches[0][0], batches[1][0]]), torch.cat([batches[0][1], batches[1][1]]),
                           lr, data.num_classes)
    only_rank0 = _plain_step(init, *batches[0], lr, data.num_classes)

    assert _max_diff(rank0, rank1) == 0.0  # every rank applied the same (averaged) update
    moved = _max_diff(combined, init)
    assert moved > 1e-3  # the step changed the weights ...
    assert _max_diff(rank0, combined) < 1e-5 * max(1.0, moved)  # ... exactly as one process on both batches
    assert _max_diff(only_rank0, combined) > 100 * _max_diff(rank0, combined)  # and not as a rank alone


# -- (b) failure, resume, reuse ---------------------------------------------------------------


@pytest.mark.timeout(300)
def test_worker_failure_resumes_from_last_epoch_and_result_is_reused(ray_local, corpus, tmp_path, monkeypatch):
    from jobs.pretrain_supernet import FAIL_AT_EPOCH_ENV, TRACE_DIR_ENV, pretrain_base

    st, splits = corpus
    cfg = zoo_config(st, splits, "t-resume")
    trace = tmp_path / "trace"
    trace.mkdir()
    monkeypatch.setenv(TRACE_DIR_ENV, str(trace))
    monkeypatch.setenv(FAIL_AT_EPOCH_ENV, "2")

    rel = pretrain_base(cfg, st, ["shapes_0_3", "marks_0_2"])

    assert rel == "supernets/t-resume/base/model.pt"
    assert (trace / "failed").exists()  # the worker really died once, mid epoch 2
    # epochs 0 and 1 were checkpointed before the crash and never ran again; epoch 2 ran twice
    assert (trace / "epochs.txt").read_text().split() == ["0", "1", "2", "2"]
    done = st.read_json("supernets/t-resume/base/done.json")
    assert done["tasks"] == ["shapes_0_3", "marks_0_2"]
    assert done["num_classes"] == 5 and done["class_offsets"] == {"shapes_0_3": 0, "marks_0_2": 3}
    assert [m["epoch"] for m in done["history"]] == [0, 1, 2]
    assert all(m["loss"] > 0 for m in done["history"])
    # 2 tasks x 48 images; global batch 16 = 2 workers x 8 -> 6 steps per epoch
    assert done["history"][-1]["step"] == 18
    state = torch.load(st.path(rel), weights_only=True)
    model = get_family(FAMILY).build(5)
    model.load_state_dict(state)
    assert st.list_files("supernets/t-resume/base/tb", suffix="")  # TensorBoard event files
    ckpts = [
        p
        for p in st.list("supernets/t-resume/base/ray_train/pretrain")
        if p.rsplit("/", 1)[-1].startswith("checkpoint_2")
    ]
    assert len(ckpts) == 2  # num_to_keep=2

    t0 = time.perf_counter()
    assert pretrain_base(cfg, st, ["shapes_0_3", "marks_0_2"]) == rel
    assert time.perf_counter() - t0 < 5  # reused: no worker group started
    assert (trace / "epochs.txt").read_text().split() == ["0", "1", "2", "2"]


@pytest.mark.timeout(300)
def test_force_trains_beside_the_finished_base_and_swaps_only_when_done(ray_local, corpus, monkeypatch, ledger):
    import jobs.pretrain_supernet as pretrain
    from tans.zoo.store import base_model_rel

    st, splits = corpus
    cfg = zoo_config(st, splits, "t-force", epochs=1, num_workers=1)
    tasks = ["shapes_0_3", "marks_0_2"]
    first = pretrain.pretrain_base(cfg, st, tasks)
    assert first == base_model_rel(st, "t-force") == "supernets/t-force/base/model.pt"
    old_model, old_done = st.read_bytes(first), st.read_bytes("supernets/t-force/base/done.json")

    # a forced rebuild that dies while training leaves the finished base exactly as it was
    class Dies:
        def fit(self):
            raise RuntimeError("node lost")

    real_trainer = pretrain._trainer
    monkeypatch.setattr(pretrain, "_trainer", lambda *a: Dies())
    cfg.force = True
    with pytest.raises(RuntimeError, match="node lost"):
        pretrain.pretrain_base(cfg, st, tasks)
    ledger.fault()
    ledger.intact({"model": old_model, "done": old_done},
                  {"model": st.read_bytes(first), "done": st.read_bytes("supernets/t-force/base/done.json")})
    assert base_model_rel(st, "t-force") == first

    monkeypatch.setattr(pretrain, "_trainer", real_trainer)
    new = pretrain.pretrain_base(cfg, st, tasks)
    assert new.startswith("supernets/t-force/base/g-") and new == base_model_rel(st, "t-force")
    assert st.read_json("supernets/t-force/base/done.json")["model"] == new
    names = {p.rsplit("/", 1)[-1] for p in st.list("supernets/t-force/base")}
    assert names == {"done.json", "run.json", new.split("/")[-2]}  # the old base's files went after the swap
    state = torch.load(st.path(new), weights_only=True)
    get_family(FAMILY).build(5).load_state_dict(state)


# -- user errors ------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_user_errors_fail_before_training(corpus, tmp_path):
    from jobs.pretrain_supernet import pretrain_base
    from tans.config import ConfigError

    st, splits = corpus
    with pytest.raises(SupernetError, match="unknown supernet family"):
        pretrain_base(ZooConfig(name="x", family="nope", splits=str(splits)), st, ["shapes_0_3"])
    with pytest.raises(SupernetError, match="could not read checkpoint"):
        pretrain_base(zoo_config(st, splits, "x", init=str(tmp_path / "missing.pt")), st, ["shapes_0_3"])
    with pytest.raises(ConfigError, match="meta_test"):
        pretrain_base(zoo_config(st, splits, "x"), st, ["shapes_0_3", "held_out_0_2"])
    assert not st.exists("supernets/x")


@pytest.mark.timeout(120)
def test_cli_missing_task_is_one_line(corpus, tmp_path):
    st, splits = corpus
    config = tmp_path / "zoo.yaml"
    config.write_text(f"name: t-cli\nfamily: {FAMILY}\nimage_size: {SIZE}\nsplits: {splits}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.pretrain_supernet", "--config", str(config), f"root={st.uri}",
         "pretrain_tasks=[shapes_0_3,not_ingested_0_5]"],
        cwd=REPO, capture_output=True, text=True, timeout=100, env={**os.environ},
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "not_ingested_0_5" in proc.stderr and "not found" in proc.stderr
    assert not st.exists("supernets/t-cli/base/done.json")

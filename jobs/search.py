"""Search: retrieve under constraints, fine-tune the best candidates in parallel (Ray Tune), report.

    tans search --dataset SRC [--max-params N] [--max-flops N] [--top-k K] [--finetune K2]
                [--epochs E] [--seeds S] [--oracle] [--config configs/search/local.yaml] [key=value ...]

1. SRC (an ImageFolder, ``builtin:<task>`` or a task in the root) becomes a task in the storage
   root; its train split is split into train / validation (seeded); its test split is only
   ever reported, never used to choose.
2. The space's extractor encodes a query from the train images; the Retriever masks the zoo by
   the constraints (an unsatisfiable one is a one-line error before any training), takes the
   top-K by cosine similarity and re-ranks them by predicted accuracy.
3. Ray Tune fine-tunes the best K2 (x the lr grid x seeds), one trial each with its fractional
   CPU/GPU share; ASHA optionally stops weak ones. The winner has the best validation accuracy.
4. Baselines in a second Tune run on the same data and seeds: scratch, scratch_matched, generic,
   random, nearest_dataset, logme (and oracle with --oracle). Trials that train the same network
   the same way are run once and shared.
5. ``<root>/searches/<run>/``: report.json (last), report.md, report.png, model/ (the winner,
   re-measured against the constraints), tune/ (Tune's experiment: TensorBoard logs per trial).

An interrupted search resumes its Tune runs (``Tuner.restore``); a finished one is reused
unless ``force=true``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from datetime import UTC, datetime

import numpy as np

from jobs._common import as_override, run_main, split_overrides
from tans.config import to_dict
from tans.job_configs import SearchConfig, load_job_config
from tans.selection.search import (
    SearchError,
    TrialResult,
    TrialSpec,
    baseline_entry,
    choose_winner,
    finetune_list,
    load_search_data,
    logme_sample,
    pick_nearest_dataset,
    pick_random,
    plot_report,
    prepare_dataset,
    report_markdown,
    summarise_candidates,
)
from tans.storage import Storage

# Test hook: a trial of this model id raises (a failing trial must not fail the search).
FAIL_MODEL_ENV = "TANS_SEARCH_FAIL_MODEL"
# Test hook: "<trial>:<dir>" - that trial's process dies (os._exit, as when its node is lost) once,
# right after its first epoch's checkpoint; <dir>/epochs.txt records every epoch it started.
DIE_ONCE_ENV = "TANS_SEARCH_DIE_ONCE"
# What a trial raises when Tune restored it without its config (seen once in CI, Ray 2.60, after an
# abrupt kill): run_trials runs such trials again in a Tune run of their own.
CONFIG_LOST = "Tune restored this trial without its config"
# What Tune raises when a resumed trial's recorded checkpoint was deleted before the kill (seen once
# in CI: num_to_keep=1 removed it after the experiment state was saved): run_trials runs such
# trials again too, from the start.
CHECKPOINT_GONE = "Could not recover from checkpoint as it does not exist"


# -- the Tune trainable ---------------------------------------------------------------------------


def finetune_trial(config: dict, data=None) -> None:
    """One Tune trial: build the spec's network, fine-tune it, report and checkpoint every epoch."""
    import torch
    from ray import tune

    from tans.selection.finetune import build_candidate, finetune
    from tans.zoo.subnets import Arch

    if "spec" not in config:
        raise RuntimeError(CONFIG_LOST)
    spec = TrialSpec(**config["spec"])
    torch.set_num_threads(max(1, int(config["threads"])))
    if os.environ.get(FAIL_MODEL_ENV) and os.environ[FAIL_MODEL_ENV] == spec.model_id:
        raise RuntimeError(f"test hook {FAIL_MODEL_ENV}: trial of {spec.model_id} fails on purpose")
    device = "cuda" if config["gpus"] > 0 and torch.cuda.is_available() else "cpu"
    model = build_candidate(spec.family, Arch.from_dict(spec.arch), len(data.classes), spec.weights_uri, spec.seed)
    state = {"val": [], "val_loss": [], "test": [], "epochs_done": 0}
    model_state = optimizer_state = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            model_state = torch.load(os.path.join(d, "model.pt"), map_location="cpu", weights_only=True)
            optimizer_state = torch.load(os.path.join(d, "optimizer.pt"), map_location="cpu", weights_only=True)
            with open(os.path.join(d, "state.json")) as f:
                state = json.load(f)
            state.setdefault("val_loss", [])  # a checkpoint written before val losses were recorded
        if state["epochs_done"] >= spec.epochs:
            return

    die_trial, _, die_dir = os.environ.get(DIE_ONCE_ENV, "").partition(":")
    if die_trial == spec.trial:
        with open(os.path.join(die_dir, "epochs.txt"), "a") as f:
            f.write(f"{state['epochs_done']}\n")

    def on_epoch(epoch, metrics, net, optimizer):
        state["val"].append(metrics["val_accuracy"])
        state["val_loss"].append(metrics["val_loss"])
        state["test"].append(metrics["test_accuracy"])
        state["epochs_done"] = metrics["epochs_done"]
        with tempfile.TemporaryDirectory() as tmp:
            torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, os.path.join(tmp, "model.pt"))
            torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
            with open(os.path.join(tmp, "state.json"), "w") as f:
                json.dump(state, f)
            tune.report({"val_accuracy": metrics["val_accuracy"], "test_accuracy": metrics["test_accuracy"],
                         "train_loss": metrics["train_loss"], "lr": metrics["lr"],
                         "epochs_done": metrics["epochs_done"],
                         "val_history": list(state["val"]), "val_loss_history": list(state["val_loss"]),
                         "test_history": list(state["test"])},
                        checkpoint=tune.Checkpoint.from_directory(tmp))
        if die_trial == spec.trial and not os.path.exists(os.path.join(die_dir, "died")):
            open(os.path.join(die_dir, "died"), "w").close()
            os._exit(1)  # the whole worker process, abruptly: Tune must restart it from the checkpoint

    finetune(model, data.train, data.val, data.test, spec.epochs, config["batch_size"], spec.lr, spec.seed,
             weight_decay=config["weight_decay"], on_epoch=on_epoch, start_epoch=state["epochs_done"],
             optimizer_state=optimizer_state, model_state=model_state, device=device,
             precision=config.get("precision", "fp32"))


def _param_space(specs: list[TrialSpec], cfg: SearchConfig) -> dict:
    from ray import tune

    return {"spec": tune.grid_search([s.to_dict() for s in specs]), "batch_size": cfg.batch_size,
            "weight_decay": cfg.weight_decay, "threads": cfg.cpus_per_trial, "gpus": cfg.gpus_per_trial,
            "precision": cfg.precision}


def run_trials(storage: Storage, run_dir: str, phase: str, specs: list[TrialSpec], data, cfg: SearchConfig,
               asha: bool) -> list[TrialResult]:
    """One Tune run over ``specs`` (resumed if it was interrupted); one result per spec."""
    from ray import tune

    if not specs:
        return []
    path = storage.path(f"{run_dir}/tune")
    fs = None if storage.is_local else storage.fs
    exp = f"{path}/{phase}"
    if not tune.Tuner.can_restore(exp, storage_filesystem=fs):
        fresh = {t.spec.trial: t for t in _trial_results(_fit(_new_tuner(path, phase, specs, data, cfg, fs, asha)))}
        return [fresh[s.trial] for s in specs]
    print(f"[search] resuming the interrupted {phase} run ({exp})", flush=True)
    restored = [r for r in _fit(_restored_tuner(exp, specs, data, cfg, fs))
                if "spec" in (r.config or {}) and CONFIG_LOST not in str(r.error or "")]
    gone = {TrialSpec(**r.config["spec"]).trial for r in restored if CHECKPOINT_GONE in str(r.error or "")}
    kept = {t.spec.trial: t for t in _trial_results(restored) if t.spec.trial not in gone}
    lost = [s for s in specs if s.trial not in kept]
    if lost:
        for what, trials in (("without their config", [s.trial for s in lost if s.trial not in gone]),
                             ("from a checkpoint that is gone", [s.trial for s in lost if s.trial in gone])):
            if trials:
                print(f"[search] Tune resumed {len(trials)} trial(s) of the {phase} run {what}; "
                      f"running them again: {', '.join(trials)}", flush=True)
        for t in run_trials(storage, run_dir, f"{phase}-rerun", lost, data, cfg, asha):
            kept[t.spec.trial] = t
    return [kept[s.trial] for s in specs]


def _trainable(data, cfg: SearchConfig):
    from ray import tune

    return tune.with_resources(tune.with_parameters(finetune_trial, data=data),
                               {"cpu": cfg.cpus_per_trial, "gpu": cfg.gpus_per_trial})


def _restored_tuner(exp: str, specs: list[TrialSpec], data, cfg: SearchConfig, fs):
    from ray import tune

    # The same param_space again: Tune does not store it, and re-stating it is what its restore
    # documentation asks for whenever the space holds anything it must resolve again.
    return tune.Tuner.restore(exp, _trainable(data, cfg), param_space=_param_space(specs, cfg),
                              resume_errored=False, restart_errored=False, storage_filesystem=fs)


def _new_tuner(path: str, phase: str, specs: list[TrialSpec], data, cfg: SearchConfig, fs, asha: bool):
    from ray import tune
    from ray.tune.logger import TBXLoggerCallback
    from ray.tune.schedulers import ASHAScheduler

    scheduler = None
    if asha:
        # Under a cosine schedule a high learning rate starts slowly; judging after one epoch
        # cut the eventual winner in 3 of 5 bench seeds, hence half the epochs by default.
        max_t = max(s.epochs for s in specs)
        grace = cfg.asha_grace_epochs or max(1, max_t // 2)
        scheduler = ASHAScheduler(time_attr="epochs_done", max_t=max_t, grace_period=min(grace, max_t),
                                  reduction_factor=2)
    return tune.Tuner(
        _trainable(data, cfg),
        param_space=_param_space(specs, cfg),
        # reuse_actors: a trial actor imports torch and the zoo's code once (~7 s on 2 cores)
        # and then runs trial after trial; every trial sets its own threads, seed and model.
        tune_config=tune.TuneConfig(metric="val_accuracy", mode="max", scheduler=scheduler, reuse_actors=True),
        run_config=tune.RunConfig(name=phase, storage_path=path, storage_filesystem=fs, verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
                                  # resuming and the export read only a trial's latest checkpoint;
                                  # every epoch's (model + optimizer) would grow a run by GBs
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                  callbacks=[TBXLoggerCallback()]),
    )


def _fit(tuner) -> list:
    # num_to_keep=1 makes Tune snapshot the experiment state after every trial checkpoint, and
    # warn each time two come within 5 s: one warning per epoch of every trial, on purpose here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    return list(tuner.fit())


def _trial_results(results: list) -> list[TrialResult]:
    """One TrialResult per Tune result."""
    out = []
    for r in results:
        spec = TrialSpec(**r.config["spec"])
        m = r.metrics or {}
        val, test = list(m.get("val_history") or []), list(m.get("test_history") or [])
        if r.error is not None:
            status = "failed"
        elif len(val) < spec.epochs:
            status = "stopped"
        else:
            status = "finished"
        error = "" if r.error is None else " ".join(str(r.error).split())[-300:]
        ckpt = r.checkpoint.path if r.checkpoint is not None else ""
        out.append(TrialResult(spec, status, val, test, error, float(m.get("time_total_s") or 0.0), ckpt,
                               val_loss=list(m.get("val_loss_history") or [])))
    return out


# -- LogME over the pool (Ray tasks) ------------------------------------------------------------


def _logme_chunk(rows: list[dict], images, labels, threads: int) -> list[float]:
    import torch
    from threadpoolctl import threadpool_limits

    from tans.data.reader import TaskTensors
    from tans.selection.finetune import build_candidate, extract_features
    from tans.selection.logme import logme_score
    from tans.zoo.subnets import Arch

    torch.set_num_threads(max(1, threads))
    data = TaskTensors(images, labels, int(labels.max()) + 1)
    scores = []
    # LogME's SVDs in numpy: one BLAS thread per core in every worker oversubscribes a small machine
    with threadpool_limits(limits=max(1, threads)):
        for row in rows:
            arch = Arch.from_dict({"ks": row["ks"], "e": row["e"], "d": row["d"]})
            net = build_candidate(row["family"], arch, 2, row["supernet_uri"], seed=0)
            scores.append(float(logme_score(extract_features(net, data), labels.numpy())))
    return scores


def logme_scores(rows: list[dict], data, n_images: int, seed: int, cpus: float) -> list[float]:
    """LogME of every row's features on (a seeded, stratified sample of) the target's train images."""
    import ray

    from tans.selection.finetune import split_train_val, subset

    train = data.train
    if n_images and len(train) > n_images:
        keep, _ = split_train_val(train.labels.numpy(), 1.0 - n_images / len(train), seed)
        train = subset(train, keep)
    n_workers = max(1, min(len(rows), int(ray.available_resources().get("CPU", 1) // cpus) or 1))
    chunks = [rows[i::n_workers] for i in range(n_workers)]
    remote = ray.remote(num_cpus=cpus)(_logme_chunk)
    img_ref, lab_ref = ray.put(train.images), ray.put(train.labels)
    outs = ray.get([remote.remote(c, img_ref, lab_ref, int(cpus)) for c in chunks])
    scores = [0.0] * len(rows)
    for i in range(n_workers):
        for j, s in zip(range(i, len(rows), n_workers), outs[i]):
            scores[j] = s
    return scores


# -- the driver ----------------------------------------------------------------------------------


def run_name(cfg: SearchConfig, task: str) -> str:
    parts = [task]
    if cfg.max_params:
        parts.append(f"p{cfg.max_params}")
    if cfg.max_flops:
        parts.append(f"f{cfg.max_flops}")
    if cfg.family:
        parts.append(cfg.family.replace(".", "_"))
    return cfg.name or "-".join(parts)


def _space_root(retriever) -> Storage:
    from tans.space.store import space_root_uri

    root = space_root_uri(retriever.info["uri"])
    if root is None:
        raise SearchError(f"the space at {retriever.info['uri']!r} is not in a storage root (<root>/spaces/<run>)")
    return Storage(root)


# Settings that only say how fast or where a search runs: they never make it another search.
NOT_IN_FINGERPRINT = ("force", "root", "name", "cpus_per_trial", "gpus_per_trial", "max_failures")


def search_fingerprint(cfg: SearchConfig, task: str, space_info: dict) -> dict:
    """What a search's answer depends on: its settings, its dataset, and the exact space it used."""
    # precision fp32 and select_by val_accuracy (the defaults) are left out, so runs recorded before
    # those options existed still match
    settings = {k: v for k, v in to_dict(cfg).items()
                if k not in NOT_IN_FINGERPRINT and (k, v) not in (("precision", "fp32"), ("select_by", "val_accuracy"))}
    return {"settings": settings, "task": task,
            "space": {k: space_info.get(k) for k in ("uri", "zoo", "created_at", "files")}}


def check_run(storage: Storage, run_dir: str, fingerprint: dict, force: bool) -> None:
    """Refuse (one line) to reuse or resume run ``run_dir`` when it was made from other inputs.

    Reuse by name alone would hand back the old report for another dataset, other settings or a
    retrained space. ``--force`` redoes the run: its interrupted trials of other settings go, the
    old report stays until the new one lands. The record (``run.json``) is written by
    :func:`claim_run` once the inputs are known to be good.
    """
    rel = f"{run_dir}/run.json"
    if storage.is_file(rel):
        old = storage.read_json(rel)
        if old != fingerprint and force:
            storage.delete(f"{run_dir}/tune")  # trials of other settings must not be resumed
        elif old != fingerprint:
            diff = sorted(k for k in {**old.get("settings", {}), **fingerprint["settings"]}
                          if old.get("settings", {}).get(k) != fingerprint["settings"].get(k))
            diff += [k for k in ("task", "space") if old.get(k) != fingerprint[k]]
            raise SearchError(f"search run {run_dir.rsplit('/', 1)[-1]!r} in {storage.uri} was made with other "
                              f"inputs ({', '.join(diff)} differ): pick another --name or pass --force")


def claim_run(storage: Storage, run_dir: str, fingerprint: dict) -> None:
    storage.write_json(f"{run_dir}/run.json", fingerprint)


def search(cfg: SearchConfig, storage: Storage) -> dict:
    """Run (or reuse) one search; returns the report (also written to searches/<run>/report.json)."""
    import contextlib

    with contextlib.ExitStack() as hold:  # holds the run's lease (taken before its first write)
        return _search(cfg, storage, hold)


class _Index:
    """The space's index columns, and TrialSpecs for its rows (one place that builds a trial)."""

    def __init__(self, retriever):
        self.retriever = retriever
        table = retriever.index_table
        self.rows = {m: i for i, m in enumerate(table.column("model_id").to_pylist())}
        self.cols = {c: table.column(c).to_pylist()
                     for c in ("task", "family", "ks", "e", "d", "accuracy", "supernet_uri")}

    def spec(self, row: int, role: str, trial: str, seed: int, lr: float, epochs: int,
             weights: str | None = "zoo", cand=None) -> TrialSpec:
        cols, r = self.cols, self.retriever
        arch = {"ks": cols["ks"][row], "e": cols["e"][row], "d": cols["d"][row]}
        return TrialSpec(trial=trial, role=role, model_id=str(r.model_ids[row]), family=cols["family"][row],
                         arch=arch, weights_uri=cols["supernet_uri"][row] if weights == "zoo" else weights,
                         epochs=epochs, lr=lr, seed=seed, task=cols["task"][row],
                         n_params=int(r.n_params[row]), flops=int(r.flops[row]),
                         similarity=None if cand is None else cand.similarity,
                         predicted_accuracy=None if cand is None else cand.predicted_accuracy)

    def logme_row(self, row: int) -> dict:
        return {k: self.cols[k][row] for k in ("family", "ks", "e", "d", "supernet_uri")}


def _search(cfg: SearchConfig, storage: Storage, hold) -> dict:
    """The stages: resolve and reuse, retrieve, fine-tune the candidates, baselines, export + report."""
    from tans.lease import Lease
    from tans.paths import search_dir
    from tans.space.retrieval import Retriever
    from tans.space.store import space_location

    t_start = time.perf_counter()
    retriever = Retriever.load(space_location(cfg.space, storage))  # SpaceNotFound: one line
    info = retriever.info
    image_size = int(info["image_size"])
    task, how = prepare_dataset(storage, cfg.dataset, image_size)
    run_dir = search_dir(run_name(cfg, task))
    fingerprint = search_fingerprint(cfg, task, info)
    check_run(storage, run_dir, fingerprint, cfg.force)
    if storage.is_file(f"{run_dir}/report.json") and not cfg.force:
        report = storage.read_json(f"{run_dir}/report.json")
        print(f"[search] reusing the finished search {storage.uri_of(run_dir)}")
        print(report_markdown(report).split("## Candidates")[0].rstrip())
        return report
    data = load_search_data(storage, task, image_size, cfg.val_fraction, cfg.seed, cfg.max_train_images,
                            cfg.max_test_images)
    constraints = {"max_params": cfg.max_params or None, "max_flops": cfg.max_flops or None,
                   "family": cfg.family or None}
    # the zoo tasks' mean query features (read once by the retriever): the nearest dataset's pick
    wants_nearest = cfg.nearest_candidate or "nearest_dataset" in cfg.baselines
    means = retriever.task_means if wants_nearest else {}
    qx, qy, result, tans_seconds = _retrieve(cfg, retriever, data, constraints)
    index = _Index(retriever)
    seeds = [cfg.seed + i for i in range(cfg.seeds)]
    nearest = _nearest_pick(index, qx, constraints, means) if wants_nearest else None
    fine = _finetuned_candidates(cfg, retriever, index, result, nearest, qx, qy)
    added = next((c.model_id for c in fine if c.model_id not in {r.model_id for r in result.candidates}), None)
    print(f"[search] {task} ({how}): {len(data.classes)} classes, train {len(data.train)} / val {len(data.val)} / "
          f"test {len(data.test)}; top {len(result.candidates)} of {len(retriever)} models in {tans_seconds:.2f}s; "
          f"fine-tuning {len(fine)} x {len(cfg.lrs)} lr x {len(seeds)} seed(s) for {cfg.epochs} epoch(s)", flush=True)
    missing = data.classes_missing()
    for split, classes in missing.items():  # too few images in a class: say so, the search still runs
        print(f"[search] warning: no {split} image of class(es) {', '.join(classes[:5])}"
              f"{' ...' if len(classes) > 5 else ''}: too few images in them", file=sys.stderr, flush=True)
    from jobs import runtime

    lease = hold.enter_context(Lease(storage, run_dir, what="tans search"))  # one writer per run
    if storage.is_file(f"{run_dir}/report.json") and not cfg.force:  # finished while we prepared: reuse it
        return storage.read_json(f"{run_dir}/report.json")
    runtime.init_ray()
    claim_run(storage, run_dir, fingerprint)
    storage.write_json(f"{run_dir}/search.json", {"config": to_dict(cfg), "task": task, "space": info["run"]})
    cand_specs = [index.spec(index.rows[c.model_id], "candidate", f"cand{i}-lr{lr:g}-s{s}", s, lr, cfg.epochs, cand=c)
                  for i, c in enumerate(fine) for lr in cfg.lrs for s in seeds]
    cand_results = run_trials(storage, run_dir, "candidates", cand_specs, data, cfg, asha=cfg.asha)
    candidates = summarise_candidates(cand_results)
    winner = choose_winner(candidates, cfg.select_by)
    loss = f", val loss {winner['val_loss']:.3f}" if winner.get("val_loss") is not None else ""
    print(f"[search] winner {winner['model_id']} (by {cfg.select_by}: val {winner['val_accuracy']:.3f}{loss}, "
          f"lr {winner['lr']:g})", flush=True)

    base_specs, extra, logme_seconds = _baseline_specs(cfg, index, winner, data, constraints, result, seeds,
                                                       nearest)
    baselines, base_results = _run_baselines(storage, run_dir, cfg, data, base_specs, extra, cand_results,
                                             candidates, len(seeds))

    # -- the winner: export, re-measure, check the constraints
    win_trials = [r for r in cand_results if r.spec.model_id == winner["model_id"] and r.spec.lr == winner["lr"]]
    model_uri, measured = _export_winner(storage, run_dir, next(r for r in win_trials if r.status != "failed"),
                                         data, image_size, winner, info, constraints, candidates, baselines)
    for key, limit in (("n_params", cfg.max_params), ("flops", cfg.max_flops)):
        if limit and measured[key] > limit:
            raise SearchError(f"the exported winner has {key}={measured[key]} > {limit}: the zoo's measurement "
                              "and the export disagree (a bug; please report it)")
    _list_unfinetuned(candidates, result.candidates)
    report = {
        "dataset": {"src": cfg.dataset, "task": task, "how": how, "classes": len(data.classes),
                    "train": len(data.train), "val": len(data.val), "test": len(data.test),
                    "classes_missing": missing},
        "constraints": dict(constraints),
        "space": {"run": info["run"], "zoo": info["zoo"], "uri": info["uri"]},
        "settings": {"top_k": cfg.top_k, "finetune": cfg.finetune, "nearest_candidate": cfg.nearest_candidate,
                     "prior_weight": cfg.prior_weight, "select_by": cfg.select_by,
                     "nearest_candidate_added": added, "epochs": cfg.epochs, "seeds": cfg.seeds,
                     "lrs": list(cfg.lrs), "batch_size": cfg.batch_size, "asha": cfg.asha, "seed": cfg.seed},
        "search_seconds": round(time.perf_counter() - t_start, 1),
        "selection_seconds": {"tans": round(tans_seconds, 3),
                              "logme": None if logme_seconds is None else round(logme_seconds, 3)},
        "retrieval_note": result.note,
        "candidates": candidates,
        "winner": {**winner, "model_uri": model_uri, "measured": measured},
        "winner_result": baseline_entry(win_trials),
        "baselines": baselines,
        "failed_trials": [{"trial": r.spec.trial, "model_id": r.spec.model_id, "error": r.error}
                          for r in [*cand_results, *base_results] if r.status == "failed"],
        "config": to_dict(cfg),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    _write_report(storage, run_dir, report, lease)
    return report


def _retrieve(cfg: SearchConfig, retriever, data, constraints: dict):
    """Encode the query and retrieve: (query features, RetrievalResult, seconds a user waits for it)."""
    import torch

    from tans.space.features import build_extractor, query_from_tensors
    from tans.space.retrieval import UnsatisfiableConstraint

    extractor = build_extractor(retriever.extractor_spec)
    t_sel = time.perf_counter()
    qx, qy = query_from_tensors(extractor, data.train, cfg.query_per_class, cfg.seed)
    prior = retriever.nearest_prior(qx) if cfg.prior_weight > 0 else None  # None: no zoo task has a query
    try:
        result = retriever.retrieve(torch.from_numpy(qx), torch.from_numpy(qy), k=cfg.top_k, rerank=cfg.rerank,
                                    prior=prior, prior_weight=cfg.prior_weight, **constraints)
    except UnsatisfiableConstraint as exc:
        raise SearchError(str(exc)) from None
    seconds = time.perf_counter() - t_sel
    if result.note:
        print(f"[search] note: {result.note}")
    return qx, qy, result, seconds


def _nearest_pick(index: _Index, qx, constraints: dict, means: dict) -> tuple[int, str, float] | None:
    """(row, zoo task, feature cosine) of the nearest zoo task's best model that meets the
    constraints; None when no zoo task has a stored query with such a model."""
    from tans.space.retrieval import constraint_mask

    retriever, cols = index.retriever, index.cols
    pool = np.flatnonzero(constraint_mask(retriever.n_params, retriever.flops, retriever.families, **constraints))
    try:
        return pick_nearest_dataset(qx.mean(axis=0), means, pool, np.asarray(cols["task"], dtype=object),
                                    np.asarray(cols["accuracy"]))
    except SearchError:
        return None


def _finetuned_candidates(cfg: SearchConfig, retriever, index: _Index, result, nearest, qx, qy) -> list:
    """The candidates to fine-tune (:func:`tans.selection.search.finetune_list`): the first
    ``finetune`` retrieved, the last slot given to the nearest dataset's model when configured."""
    import torch

    from tans.space.retrieval import Candidate

    by_id = {c.model_id: c for c in result.candidates}
    near_id = str(retriever.model_ids[nearest[0]]) if cfg.nearest_candidate and nearest is not None else None
    chosen = finetune_list([c.model_id for c in result.candidates], near_id, cfg.finetune)
    if near_id in chosen and near_id not in by_id:  # not retrieved: score it as the retrieval would have
        row = nearest[0]
        sims, pred = retriever.score_rows(torch.from_numpy(qx), torch.from_numpy(qy), [row])
        by_id[near_id] = Candidate(model_id=near_id, task=str(retriever.tasks[row]), similarity=float(sims[0]),
                                   predicted_accuracy=float(pred[0]), n_params=int(retriever.n_params[row]),
                                   flops=int(retriever.flops[row]))
    return [by_id[m] for m in chosen]


def _baseline_specs(cfg: SearchConfig, index: _Index, winner: dict, data, constraints: dict, result,
                    seeds: list[int], nearest: tuple[int, str, float] | None
                    ) -> tuple[dict[str, list[TrialSpec]], dict[str, dict], float | None]:
    """The baselines' (and the oracle's) trials: same data, seeds, epochs and lr as the winner.
    ``nearest``: :func:`_nearest_pick`'s answer. Returns (trials by baseline, extra report fields
    by baseline, LogME's seconds or None)."""
    from tans.space.retrieval import constraint_mask

    retriever, info = index.retriever, index.retriever.info
    w_row, w_lr = index.rows[winner["model_id"]], winner["lr"]
    pool = np.flatnonzero(constraint_mask(retriever.n_params, retriever.flops, retriever.families, **constraints))
    space_root = _space_root(retriever)
    specs: dict[str, list[TrialSpec]] = {}
    extra: dict[str, dict] = {}

    def same_as_winner(role: str, row: int, trial: str, epochs: int = cfg.epochs, weights: str | None = "zoo"):
        return [index.spec(row, role, f"{trial}-s{s}", s, w_lr, epochs, weights=weights) for s in seeds]

    if "scratch" in cfg.baselines:
        specs["scratch"] = same_as_winner("scratch", w_row, "scratch", weights=None)
    if "scratch_matched" in cfg.baselines:
        matched = cfg.epochs * min(cfg.finetune, len(result.candidates)) * len(cfg.lrs)
        specs["scratch_matched"] = same_as_winner("scratch_matched", w_row, "scratch_matched", matched, weights=None)
        extra["scratch_matched"] = {"epochs": matched}
    if "generic" in cfg.baselines:
        from tans.zoo.store import base_model_rel

        base = space_root.uri_of(base_model_rel(space_root, info["zoo"]))
        specs["generic"] = same_as_winner("generic", w_row, "generic", weights=base)
    if "random" in cfg.baselines:
        picks = pick_random(pool, cfg.random_models, cfg.seed)
        specs["random"] = [s for j, r in enumerate(picks) for s in same_as_winner("random", r, f"random{j}")]
    if "nearest_dataset" in cfg.baselines:
        if nearest is None:
            raise SearchError("no zoo task with a query has a model that meets the constraints")
        row, near_task, sim = nearest
        specs["nearest_dataset"] = same_as_winner("nearest_dataset", row, "nearest")
        extra["nearest_dataset"] = {"zoo_task": near_task, "feature_cosine": sim}
    logme_seconds = None
    if "logme" in cfg.baselines:
        sample = logme_sample(pool, cfg.logme_pool, cfg.seed)
        t_l = time.perf_counter()
        scores = logme_scores([index.logme_row(r) for r in sample], data, cfg.logme_images, cfg.seed,
                              cfg.cpus_per_trial)
        logme_seconds = time.perf_counter() - t_l
        specs["logme"] = same_as_winner("logme", int(sample[int(np.argmax(scores))]), "logme")
        extra["logme"] = {"pool_size": int(len(pool)), "pool_scored": int(len(sample)), "score": float(max(scores)),
                          "seconds": round(logme_seconds, 2)}
        print(f"[search] LogME scored {len(sample)} of {len(pool)} pool models in {logme_seconds:.1f}s", flush=True)
    if cfg.oracle:
        specs["oracle"] = [index.spec(index.rows[c.model_id], "oracle", f"oracle{i}-s{s}", s, w_lr, cfg.epochs, cand=c)
                           for i, c in enumerate(result.candidates) for s in seeds]
    return specs, extra, logme_seconds


def _run_baselines(storage: Storage, run_dir: str, cfg: SearchConfig, data, base_specs: dict[str, list[TrialSpec]],
                   extra: dict[str, dict], cand_results: list[TrialResult], candidates: list[dict],
                   n_seeds: int) -> tuple[dict, list[TrialResult]]:
    """Run the baselines' trials (a network trained the same way twice is trained once: results
    are shared by TrialSpec.key()); (baselines for the report, their results). The oracle's
    fine-tuned candidates are appended to ``candidates``."""
    done = {r.spec.key(): r for r in cand_results if r.status == "finished"}
    todo: dict[tuple, TrialSpec] = {}
    for specs in base_specs.values():
        for s in specs:
            if s.key() not in done and s.key() not in todo:
                todo[s.key()] = s
    print(f"[search] baselines: {len(todo)} fine-tune(s) to run "
          f"({sum(len(v) for v in base_specs.values()) - len(todo)} shared)", flush=True)
    base_results = run_trials(storage, run_dir, "baselines", list(todo.values()), data, cfg, asha=False)
    for r in base_results:
        done.setdefault(r.spec.key(), r)
    baselines = {}
    for name, specs in base_specs.items():
        results = [replace(done[s.key()], spec=s) if s.key() in done else TrialResult(s, "failed", error="not run")
                   for s in specs]
        if name != "oracle":
            baselines[name] = baseline_entry(results, **extra.get(name, {}))
            continue
        cands = summarise_candidates(results)
        ok = [c for c in cands if c["test_accuracy"] is not None]
        best = max(ok, key=lambda c: c["test_accuracy"]) if ok else None
        baselines["oracle"] = {"test_accuracy": best and best["test_accuracy"], "std": best and best["test_std"],
                               "n": n_seeds, "models": [best["model_id"]] if best else [],
                               "epoch_accuracy": best["epoch_accuracy"] if best else [],
                               "candidates_finetuned": len(cands)}
        # every top-k candidate now has a fine-tuned result: show them all in the report
        known = {c["model_id"] for c in candidates}
        candidates += [c for c in cands if c["model_id"] not in known]
    return baselines, base_results


def _list_unfinetuned(candidates: list[dict], retrieved) -> None:
    """Add the retrieved but not fine-tuned candidates to ``candidates``; sort all in retrieval order."""
    order = {c.model_id: i for i, c in enumerate(retrieved)}
    for c in retrieved:
        if c.model_id not in {x["model_id"] for x in candidates}:
            candidates.append({"model_id": c.model_id, "task": c.task, "n_params": c.n_params, "flops": c.flops,
                               "lr": None, "similarity": c.similarity, "predicted_accuracy": c.predicted_accuracy,
                               "val_accuracy": None, "test_accuracy": None, "test_std": None, "epoch_accuracy": [],
                               "epoch_val_accuracy": [], "seeds": 0, "status": "not fine-tuned", "errors": [],
                               "trials": []})
    candidates.sort(key=lambda c: order.get(c["model_id"], 1 << 30))


def _write_report(storage: Storage, run_dir: str, report: dict, lease) -> None:
    """report.md, report.png, then report.json last (it marks the search as finished)."""
    storage.write_text(f"{run_dir}/report.md", report_markdown(report))
    with tempfile.TemporaryDirectory() as tmp:
        png = os.path.join(tmp, "report.png")
        plot_report(report, png)
        with open(png, "rb") as f:
            storage.write_bytes(f"{run_dir}/report.png", f.read())
    lease.check()  # another writer took the run over: leave the report to it
    storage.write_json(f"{run_dir}/report.json", report)
    print(report_markdown(report).split("## Candidates")[0].rstrip())
    print(f"[search] done in {report['search_seconds']:.0f}s -> {storage.uri_of(run_dir)}", flush=True)


def _card_tables(winner: dict, candidates: list[dict], baselines: dict) -> dict[str, list[dict]]:
    """The search's tables as the model card shows them (accuracies in %, mean ± std over seeds)."""

    def pct(x):
        return None if x is None else round(100 * x, 1)

    def acc(entry: dict) -> str | None:
        if entry.get("test_accuracy") is None:
            return None
        std = entry.get("std", entry.get("test_std"))
        n = entry.get("n", entry.get("seeds", 1))
        spread = f" ± {100 * std:.1f}" if n and n > 1 and std is not None else ""
        return f"{100 * entry['test_accuracy']:.1f}{spread}"

    methods = [{"method": "**TANS pick**", "model": f"`{winner['model_id']}`", "test accuracy (%)": acc(winner)}]
    methods += [{"method": name, "model": ", ".join(f"`{m}`" for m in b.get("models", [])[:3]),
                 "test accuracy (%)": acc(b)} for name, b in baselines.items()]
    cands = [{"model": f"`{c['model_id']}`", "zoo task": c["task"], "lr": c["lr"], "params": c["n_params"],
              "MFLOPs": round(c["flops"] / 1e6, 1), "predicted (%)": pct(c["predicted_accuracy"]),
              "val (%)": pct(c["val_accuracy"]), "test (%)": pct(c["test_accuracy"]), "status": c["status"],
              "winner": c["model_id"] == winner["model_id"] and c["lr"] == winner["lr"]} for c in candidates]
    return {"Test accuracy against the baselines": methods, "Fine-tuned candidates": cands}


def _export_winner(storage: Storage, run_dir: str, trial: TrialResult, data, image_size: int, winner: dict,
                   info: dict, constraints: dict, candidates: list[dict], baselines: dict) -> tuple[str, dict]:
    import io

    import torch

    from tans.selection.export import export_model
    from tans.selection.finetune import build_structure, model_size
    from tans.zoo.subnets import Arch

    spec = trial.spec
    arch = Arch.from_dict(spec.arch)
    model = build_structure(spec.family, arch, len(data.classes))
    fs, path = storage.fs, trial.checkpoint
    with fs.open_input_stream(f"{path}/model.pt") as f:
        state = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    model.eval()
    n_params, flops = model_size(model, image_size)
    uri = export_model(storage, f"{run_dir}/model", model, spec.family, arch, data.classes, image_size,
                       extra={"model_id": spec.model_id, "zoo_task": spec.task, "space": info["run"],
                              "val_accuracy": winner["val_accuracy"], "test_accuracy": trial.final_test,
                              "seed": spec.seed, "lr": spec.lr, "epochs": spec.epochs,
                              "constraints": {k: v for k, v in constraints.items() if v}},
                       tables=_card_tables(winner, candidates, baselines))
    return uri, {"n_params": int(n_params), "flops": int(flops)}


# -- command line ----------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tans search", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="search config YAML (default: configs/search/local.yaml)")
    p.add_argument("--dataset", help="ImageFolder dir (local or s3://), builtin:<task>, or a task in the root")
    p.add_argument("--root", help="storage root (default: $TANS_ROOT, else ~/.cache/tans)")
    p.add_argument("--space", help="space URI or run name (default: <root>/spaces/LATEST)")
    p.add_argument("--max-params", type=int, help="largest number of parameters allowed")
    p.add_argument("--max-flops", type=int, help="largest number of FLOPs allowed")
    p.add_argument("--top-k", type=int, help="candidates to retrieve")
    p.add_argument("--finetune", type=int, help="of those, how many to fine-tune")
    p.add_argument("--epochs", type=int, help="fine-tuning epochs")
    p.add_argument("--seeds", type=int, help="repeat every fine-tune with this many seeds")
    p.add_argument("--oracle", action="store_true", help="also fine-tune every top-k candidate")
    p.add_argument("--name", help="the run's name under searches/")
    p.add_argument("--force", action="store_true", help="redo a finished search")
    overrides, rest = split_overrides(argv, p)
    args = p.parse_args(rest)
    flags = {"dataset": args.dataset, "root": args.root, "space": args.space, "max_params": args.max_params,
             "max_flops": args.max_flops, "top_k": args.top_k, "finetune": args.finetune, "epochs": args.epochs,
             "seeds": args.seeds, "name": args.name}
    args.overrides = overrides + [as_override(k, v) for k, v in flags.items() if v is not None]
    args.overrides += (["oracle=true"] if args.oracle else []) + (["force=true"] if args.force else [])
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    cfg: SearchConfig = load_job_config("search", args.config, args.overrides)
    search(cfg, Storage(cfg.root or None))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))

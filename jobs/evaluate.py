"""Evaluate: the field's model-selection protocol over a pool, for every selector, with seeds.

    tans evaluate [--config configs/evaluate/local.yaml] [--dataset SRC ...] [--max-params N]
                  [--seeds 0,1] [--name RUN] [--force] [key=value ...]

For every target (SRC as for ``tans search``; default: the splits' meta_test tasks) and seed:

1. The target's train split is cut into train / validation exactly as ``tans search`` does
   (the search recipe's caps, ``val_fraction``, the seed); its test split is only reported.
2. The *pool*: zoo models that meet the constraints, minus the target's own source, or a
   seeded sample of ``pool_cap`` of them stratified over zoo tasks and sizes.
3. Every selector scores the pool (timed): ``tans_similarity``, ``tans_predicted``, the
   ``tans_search`` pick (retrieve, fine-tune the best K2, choose on validation), ``logme``,
   ``hscore``, ``nleep``, ``linear_probe`` (frozen features of every pool model, Ray tasks),
   ``nearest_dataset``, ``size``, ``random``.
4. Ground truth: every pool model fine-tuned with the search recipe unchanged, as Ray Tune
   trials in parallel, plus references outside the pool (``scratch``, ``generic``,
   ``scratch_long`` = 10x the epochs, first seed only).
5. ``<root>/evaluations/<run>/targets/<task>-s<seed>.json`` when that record is complete; at the
   end evaluation.json (raw numbers + summary, written last), evaluation.md, evaluation.png.

Interrupted runs resume: finished records are kept, an interrupted Tune run is restored.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import UTC, datetime

import numpy as np

from jobs._common import as_override, run_main, split_overrides
from tans import paths
from tans.config import to_dict
from tans.data.tasks import read_task_info
from tans.job_configs import EvaluateConfig, SearchConfig, load_job_config, load_splits
from tans.selection.evaluation import (
    FEATURE_METHODS,
    METHODS,
    evaluation_markdown,
    excluded_tasks,
    plot_evaluation,
    pool_stats,
    random_scores,
    sample_pool,
    size_scores,
    tans_search_pick,
)
from tans.selection.search import (
    SearchError,
    TrialSpec,
    finetune_list,
    load_search_data,
    prepare_dataset,
)
from tans.space.prior import nearest_dataset_scores, zoo_task_means
from tans.storage import Storage

# the recipe's settings that the cache key of the ground truth includes: every one that changes a
# cached number (the pool's fine-tunes, the references, the frozen-feature scores). top_k,
# finetune, rerank, nearest_candidate and prior_weight only change which of those numbers the TANS
# picks read, so evaluations that differ in them alone share one ground truth (but not a run: RECIPE_KEYS).
CACHE_KEYS = ("epochs", "lrs", "batch_size", "weight_decay", "val_fraction", "max_train_images", "max_test_images",
              "query_per_class", "logme_images")
# in evaluation.json and run.json
RECIPE_KEYS = CACHE_KEYS + ("top_k", "finetune", "rerank", "nearest_candidate", "prior_weight", "select_by")


# -- frozen-feature scores of the pool (Ray tasks) -------------------------------------------------


def _feature_scores_chunk(rows: list[dict], images, labels, threads: int, methods: list[str]) -> list[dict]:
    """For each zoo row: its features on the images, then every transferability score of them."""
    import torch
    from threadpoolctl import threadpool_limits

    from tans.data.reader import TaskTensors
    from tans.selection.finetune import build_candidate, extract_features
    from tans.selection.transferability import SCORERS
    from tans.zoo.subnets import Arch

    torch.set_num_threads(max(1, threads))
    # numpy's BLAS would otherwise start one thread per core in every worker: on a small machine
    # the SVDs of LogME and H-score then run 10-20x slower than on the worker's own share
    data = TaskTensors(images, labels, int(labels.max()) + 1)
    y = labels.numpy()
    out = []
    with threadpool_limits(limits=max(1, threads)):
        for row in rows:
            t0 = time.perf_counter()
            arch = Arch.from_dict({"ks": row["ks"], "e": row["e"], "d": row["d"]})
            net = build_candidate(row["family"], arch, 2, row["supernet_uri"], seed=0)
            feats = extract_features(net, data)
            entry = {"feature_seconds": time.perf_counter() - t0, "scores": {}, "seconds": {}}
            for m in methods:
                t1 = time.perf_counter()
                entry["scores"][m] = float(SCORERS[m](feats, y))
                entry["seconds"][m] = time.perf_counter() - t1
            out.append(entry)
    return out


def feature_scores(rows: list[dict], data, n_images: int, seed: int, cpus: float, methods: list[str]) -> list[dict]:
    """Every feature-based score of every row, on a seeded stratified sample of the train images."""
    import ray

    from tans.selection.finetune import split_train_val, subset

    train = data.train
    if n_images and len(train) > n_images:
        keep, _ = split_train_val(train.labels.numpy(), 1.0 - n_images / len(train), seed)
        train = subset(train, keep)
    n_workers = max(1, min(len(rows), int(ray.available_resources().get("CPU", 1) // cpus) or 1))
    remote = ray.remote(num_cpus=cpus)(_feature_scores_chunk)
    img_ref, lab_ref = ray.put(train.images), ray.put(train.labels)
    chunks = [list(range(i, len(rows), n_workers)) for i in range(n_workers)]
    outs = ray.get([remote.remote([rows[j] for j in c], img_ref, lab_ref, max(1, int(cpus)), methods) for c in chunks])
    result: list[dict] = [{}] * len(rows)
    for c, o in zip(chunks, outs):
        for j, entry in zip(c, o):
            result[j] = entry
    return result


# -- one target and seed ------------------------------------------------------------------------------


class _Zoo:
    """The space's index columns the evaluation needs, row-aligned with the Retriever."""

    def __init__(self, retriever):
        t = retriever.index_table
        self.retriever = retriever
        self.ids = [str(m) for m in retriever.model_ids]
        self.tasks = np.asarray(t.column("task").to_pylist(), dtype=object)
        self.cols = {c: t.column(c).to_pylist() for c in ("family", "ks", "e", "d", "accuracy", "supernet_uri")}
        self.archs = [(tuple(k), tuple(e), tuple(d)) for k, e, d in zip(self.cols["ks"], self.cols["e"],
                                                                          self.cols["d"])]

    def spec(self, row: int, trial: str, seed: int, lr: float, epochs: int, weights: str | None = "zoo",
             role: str = "pool") -> TrialSpec:
        c = self.cols
        return TrialSpec(trial=trial, role=role, model_id=self.ids[row], family=c["family"][row],
                         arch={"ks": c["ks"][row], "e": c["e"][row], "d": c["d"][row]},
                         weights_uri=c["supernet_uri"][row] if weights == "zoo" else weights, epochs=epochs, lr=lr,
                         seed=seed, task=str(self.tasks[row]), n_params=int(self.retriever.n_params[row]),
                         flops=int(self.retriever.flops[row]))

    def feature_row(self, row: int) -> dict:
        return {k: self.cols[k][row] for k in ("family", "ks", "e", "d", "supernet_uri")}


def allowed_rows(cfg: EvaluateConfig, storage: Storage, zoo: _Zoo, zoo_sources: dict, task: str):
    """(rows a pool may draw from, zoo tasks left out) for ``task``; SearchError if fewer than 2."""
    from tans.space.retrieval import constraint_mask

    r = zoo.retriever
    excluded = excluded_tasks(task, read_task_info(storage, task).source or "", zoo_sources)
    mask = constraint_mask(r.n_params, r.flops, r.families, cfg.max_params or None, cfg.max_flops or None)
    mask &= ~np.isin(zoo.tasks, sorted(excluded))
    allowed = np.flatnonzero(mask)
    if len(allowed) < 2:
        i = r.smallest_model()
        raise SearchError(f"{task}: {len(allowed)} zoo model(s) meet max_params={cfg.max_params or None}, "
                          f"max_flops={cfg.max_flops or None} outside the target's own source (a pool needs 2; the "
                          f"smallest model has n_params={r.n_params[i]}, flops={r.flops[i]}): relax the constraint")
    return allowed, excluded


def measure_pool(cfg: EvaluateConfig, recipe: SearchConfig, storage: Storage, zoo: _Zoo, data, pool: np.ndarray,
                 base_uri: str, task: str, seed: int, wanted_features: list[str]) -> dict:
    """What does not depend on the space: the feature-based scores, the ground truth, the references.

    Cached under ``evaluations/_cache/<zoo>/`` by a fingerprint of everything that determines them
    (zoo build, target, seed, pool, recipe, references), so judging another space over the same
    targets costs seconds instead of re-running every fine-tune. The Tune run lives there too,
    and resumes after an interruption.
    """
    from jobs.search import run_trials

    ids = [zoo.ids[r] for r in pool]
    lr = float(recipe.lrs[0])
    specs = [zoo.spec(r, f"m{i:03d}", seed, lr, recipe.epochs) for i, r in enumerate(pool)]
    ref_row = int(pool[np.argmax(zoo.retriever.n_params[pool])])  # references train the pool's largest architecture
    refs = {"scratch": (None, recipe.epochs), "generic": (base_uri, recipe.epochs),
            "scratch_long": (None, recipe.epochs * cfg.scratch_long_factor)}
    ref_specs = {}
    for name in cfg.references:
        if name == "scratch_long" and seed != cfg.seeds[0]:
            continue
        weights, epochs = refs[name]
        ref_specs[name] = zoo.spec(ref_row, name, seed, lr, epochs, weights=weights, role=name)
    # a zoo rebuilt with other settings measures its models differently: their zoo accuracies are in the key
    key = _fingerprint({"zoo": zoo.retriever.info["zoo"], "task": task, "seed": seed, "pool": ids,
                        "zoo_accuracy": [zoo.cols["accuracy"][r] for r in pool],
                        "recipe": {**{k: getattr(recipe, k) for k in CACHE_KEYS},
                                   # bf16 fine-tunes are another ground truth; fp32 keeps old keys valid
                                   **({"precision": recipe.precision} if recipe.precision != "fp32" else {})},
                        "references": {n: s.to_dict() for n, s in ref_specs.items()}})
    cache_dir = paths.evaluation_cache_dir(zoo.retriever.info["zoo"])
    rel = f"{cache_dir}/{task}-s{seed}-{key}.json"
    tune_rel = f"{cache_dir}/tune/{task}-s{seed}-{key}"  # run_trials' experiment for this record
    cached = storage.read_json(rel) if storage.is_file(rel) and not cfg.force else None
    if cached is not None and cached.get("failed"):
        # a failed fine-tune (a full disk, a lost node) is not a measurement: measure the pool again,
        # from a fresh Tune run (a restored one would keep its errored trials)
        print(f"[evaluate] {task} seed {seed}: {len(cached['failed'])} fine-tune(s) failed last time; measuring again",
              flush=True)
        storage.delete(tune_rel)
        storage.delete(f"{tune_rel}-rerun")  # where run_trials re-ran trials Tune resumed without their config
        cached = None
    if cached is not None and recipe.select_by == "val_loss" and any(
            t.get("val_loss") is None for t in cached["ground_truth"].values()):
        # recorded before fine-tunes kept their validation loss: the rule needs it, so measure again
        # (the fine-tunes are deterministic on CPU: the same accuracies, now with their losses)
        print(f"[evaluate] {task} seed {seed}: the cached ground truth has no validation losses, which "
              f"select_by=val_loss needs; measuring again", flush=True)
        cached = None
    if cached is not None and all(m in cached["features"] for m in wanted_features):
        print(f"[evaluate] {task} seed {seed}: ground truth and feature scores of this pool measured earlier "
              f"({storage.uri_of(rel)})", flush=True)
        return cached
    features = {}
    if wanted_features:
        fs = feature_scores([zoo.feature_row(r) for r in pool], data, recipe.logme_images, seed, recipe.cpus_per_trial,
                            wanted_features)
        for m in wanted_features:
            # the time one method alone costs: every model's features, then its own scoring
            features[m] = {"scores": {i: e["scores"][m] for i, e in zip(ids, fs)},
                           "seconds": sum(e["feature_seconds"] + e["seconds"][m] for e in fs)}
        print(f"[evaluate] {task} seed {seed}: {', '.join(wanted_features)} of {len(pool)} models in "
              f"{sum(e['feature_seconds'] for e in fs):.1f}s of feature extraction", flush=True)
    # the longest trial first: Tune starts trials in order, so scratch_long runs beside the pool's
    # fine-tunes instead of alone after them
    trials = sorted(specs + list(ref_specs.values()), key=lambda s: -s.epochs)
    results = run_trials(storage, cache_dir, f"{task}-s{seed}-{key}", trials, data, recipe, asha=False)
    by_trial = {r.spec.trial: r for r in results}
    truth, failed = {}, []
    for spec in specs:
        r = by_trial[spec.trial]
        if r.status == "finished":
            truth[spec.model_id] = {"test_accuracy": r.final_test, "val_accuracy": r.final_val,
                                    "val_loss": r.final_val_loss, "std": 0.0, "n": 1, "seconds": round(r.seconds, 2),
                                    "epoch_test_accuracy": r.test_accuracy, "epoch_val_accuracy": r.val_accuracy,
                                    "epoch_val_loss": r.val_loss}
        else:
            failed.append({"model_id": spec.model_id, "error": r.error or r.status})
    references = {}
    for name, spec in ref_specs.items():
        r = by_trial[spec.trial]
        references[name] = {"test_accuracy": r.final_test, "val_accuracy": r.final_val, "epochs": spec.epochs,
                            "model_id": spec.model_id, "status": r.status, "epoch_test_accuracy": r.test_accuracy}
    out = {"features": features, "ground_truth": truth, "failed": failed, "references": references}
    storage.write_json(rel, out)
    if not failed:
        # the numbers are in the cache file now; the trials' checkpoints (model + optimizer after
        # every epoch, ~2 GB per record on the local profile) are only needed to resume
        storage.delete(tune_rel)
    return out


def _fingerprint(obj) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def evaluate_target(cfg: EvaluateConfig, recipe: SearchConfig, storage: Storage, run_dir: str, zoo: _Zoo,
                    extractor, task_means: dict, zoo_sources: dict, base_uri: str, task: str, seed: int) -> dict:
    """One record: pool, every method's scores and pick, the ground truth, the references."""
    import torch

    from tans.selection.metrics import ranked_ids
    from tans.space.features import query_from_tensors
    from tans.space.retrieval import blend_with_prior

    retriever = zoo.retriever
    image_size = int(retriever.info["image_size"])
    data = load_search_data(storage, task, image_size, recipe.val_fraction, seed, recipe.max_train_images,
                            recipe.max_test_images)
    allowed, excluded = allowed_rows(cfg, storage, zoo, zoo_sources, task)
    pool = sample_pool(allowed, zoo.tasks, retriever.n_params, cfg.pool_cap, seed)
    ids = [zoo.ids[r] for r in pool]
    methods = list(cfg.methods) or list(METHODS)
    print(f"[evaluate] {task} seed {seed}: {len(data.classes)} classes, train {len(data.train)} / val "
          f"{len(data.val)} / test {len(data.test)}; pool {len(pool)} of {len(allowed)} allowed models"
          f"{f' (left out: {len(excluded)} zoo task(s) of its source)' if excluded else ''}", flush=True)
    scores: dict[str, dict] = {}

    # TANS: encode the query once, then the space's two scores of every pool model
    t0 = time.perf_counter()
    qx, qy = query_from_tensors(extractor, data.train, recipe.query_per_class, seed)
    t_query = time.perf_counter() - t0
    sims, pred = retriever.score_rows(torch.from_numpy(qx), torch.from_numpy(qy), pool)
    t_tans = time.perf_counter() - t0
    scores["tans_similarity"] = {"scores": dict(zip(ids, sims.tolist())), "seconds": t_tans}
    scores["tans_predicted"] = {"scores": dict(zip(ids, pred.tolist())), "seconds": t_tans}

    t1 = time.perf_counter()
    near = nearest_dataset_scores(qx.mean(axis=0), {t: m for t, m in task_means.items() if t not in excluded}, ids,
                                  [str(zoo.tasks[r]) for r in pool], [zoo.cols["accuracy"][r] for r in pool])
    t_near = time.perf_counter() - t1
    scores["nearest_dataset"] = {"scores": near, "seconds": t_query + t_near}
    # what `tans search` ranks by: the similarity, or with the recipe's prior_weight > 0 the
    # predictor's score blended with the nearest-dataset score (tans.space.retrieval.blend_with_prior)
    t2 = time.perf_counter()
    prior = np.zeros(len(retriever))
    prior[pool] = [near[m] for m in ids]
    retrieved = retriever.retrieve(torch.from_numpy(qx), torch.from_numpy(qy), k=recipe.top_k, rows=pool,
                                   rerank=recipe.rerank, prior=prior, prior_weight=recipe.prior_weight)
    blended = recipe.prior_weight > 0
    ranking = blend_with_prior(torch.from_numpy(pred if blended else sims), prior[pool], recipe.prior_weight,
                               torch.ones(len(pool), dtype=torch.bool))
    seconds = t_tans + (t_near if blended else 0.0) + time.perf_counter() - t2
    scores["tans_retrieval"] = {"scores": dict(zip(ids, ranking.tolist())), "seconds": seconds}
    # what `tans search` fine-tunes: the retrieval's first `finetune`, the last slot given to the
    # nearest dataset's model when the recipe says so (tans.selection.search.finetune_list)
    near_pick = ranked_ids(near)[0] if recipe.nearest_candidate else None
    finetuned = finetune_list([c.model_id for c in retrieved.candidates], near_pick, recipe.finetune)
    scores["size"] = {"scores": size_scores(ids, [int(retriever.n_params[r]) for r in pool]), "seconds": 0.0}
    scores["random"] = {"scores": random_scores(ids, seed), "seconds": 0.0}
    wanted_features = [m for m in FEATURE_METHODS if m in methods]
    measured = measure_pool(cfg, recipe, storage, zoo, data, pool, base_uri, task, seed, wanted_features)
    for m in wanted_features:
        scores[m] = measured["features"][m]
    truth, failed, references = measured["ground_truth"], measured["failed"], measured["references"]

    # tans_search: what `tans search` returns, from the trials it would itself have run
    pick = tans_search_pick(finetuned, truth, recipe.select_by)
    search_seconds = t_tans + (t_near if near_pick else 0.0) + sum(truth[m]["seconds"] for m in finetuned if m in truth)
    scores["tans_search"] = {"scores": None, "pick": pick, "finetuned": finetuned, "seconds": search_seconds}
    out_methods = {}
    for m in methods:
        entry = dict(scores[m])
        if entry.get("scores") is not None:
            # a model whose ground-truth fine-tune failed leaves the pool for every selector
            ranked = [i for i in ranked_ids(entry["scores"]) if i in truth]
            entry["pick"] = ranked[0] if ranked else None
        entry["seconds"] = round(float(entry["seconds"]), 4)
        out_methods[m] = entry
    return {"task": task, "src": task, "seed": seed, "classes": len(data.classes),
            "images": {"train": len(data.train), "val": len(data.val), "test": len(data.test)},
            "excluded_zoo_tasks": sorted(excluded), "pool": ids,
            "pool_stats": pool_stats(pool, zoo.tasks, zoo.archs), "ground_truth": truth, "failed": failed,
            "references": references, "methods": out_methods}


# -- the driver ----------------------------------------------------------------------------------------------


def load_recipe(cfg: EvaluateConfig) -> SearchConfig:
    overrides = []
    if cfg.cpus_per_trial > 0:
        overrides.append(f"cpus_per_trial={cfg.cpus_per_trial}")
    if cfg.gpus_per_trial >= 0:
        overrides.append(f"gpus_per_trial={cfg.gpus_per_trial}")
    if cfg.select_by:
        overrides.append(f"select_by={cfg.select_by}")
    return load_job_config("search", cfg.search, overrides)


def evaluate(cfg: EvaluateConfig, storage: Storage) -> dict:
    """Run (or resume) one evaluation; returns evaluation.json's content."""
    import contextlib

    with contextlib.ExitStack() as hold:  # holds the run's lease (taken before its first write)
        return _evaluate(cfg, storage, hold)


def check_not_learned(info: dict, task: str) -> None:
    """A space whose predictor learned from fine-tunes on ``task`` (train-space ``transfer_runs``)
    has seen the answers there: judging it on ``task`` is refused."""
    if task in set((info.get("transfer") or {}).get("tasks") or []):
        raise SearchError(f"space {info['run']!r} learned from fine-tunes on {task!r} (its transfer_runs): "
                          "judge it on other targets, or with a space trained without them")


def _evaluate(cfg: EvaluateConfig, storage: Storage, hold) -> dict:
    from tans.selection.metrics import summarise_methods
    from tans.space.features import build_extractor
    from tans.space.retrieval import Retriever

    t_start = time.perf_counter()
    recipe = load_recipe(cfg)
    from tans.space.store import space_location

    retriever = Retriever.load(space_location(cfg.space, storage))  # SpaceNotFound: one line
    info = retriever.info
    uri = info["uri"]
    space_root = Storage(uri[: uri.rindex(f"/{paths.SPACES}/")])
    srcs = list(cfg.datasets)
    if not srcs:
        splits_path = cfg.splits or info.get("splits") or "configs/splits/default.yaml"
        srcs = list(load_splits(splits_path).meta_test)
        if not srcs:
            raise SearchError(f"{splits_path} has no meta_test tasks; name targets with --dataset")
    run = cfg.name or info["run"]
    run_dir = paths.evaluation_dir(run)
    settings = {"constraints": {"max_params": cfg.max_params or None, "max_flops": cfg.max_flops or None},
                "seeds": list(cfg.seeds), "pool_cap": cfg.pool_cap, "methods": list(cfg.methods) or list(METHODS),
                "references": list(cfg.references), "scratch_long_factor": cfg.scratch_long_factor,
                "recipe": {"config": cfg.search, "lr": float(recipe.lrs[0]),
                           **{k: getattr(recipe, k) for k in RECIPE_KEYS}}}
    # a run name is reused only for the same settings and space: never mix two protocols in one run
    fingerprint = {"settings": settings, "space": info["run"], "zoo": info["zoo"]}
    if storage.is_file(f"{run_dir}/run.json") and not cfg.force:
        old = storage.read_json(f"{run_dir}/run.json")
        if old.get("fingerprint") != fingerprint:
            raise SearchError(f"evaluation {run!r} exists with other settings or another space; "
                              "pick another name= or pass --force")
    zoo = _Zoo(retriever)
    zoo_sources = {}
    for t in sorted(set(zoo.tasks.tolist())):
        try:
            zoo_sources[t] = read_task_info(space_root, t).source or ""
        except Exception:  # a zoo whose tasks are not in this root: no source to match
            zoo_sources[t] = ""
    # every target is resolved and checked before anything is written or any Ray work starts
    image_size = int(info["image_size"])
    targets, seen = [], set()
    for src in srcs:
        task, how = prepare_dataset(storage, src, image_size)
        if task not in seen:  # the same target named twice is evaluated once
            seen.add(task)
            print(f"[evaluate] target {task}: {how}", flush=True)
            targets.append((src, task, how))
    for _, task, _ in targets:
        check_not_learned(info, task)
        allowed_rows(cfg, storage, zoo, zoo_sources, task)
    from tans.lease import Lease

    lease = hold.enter_context(Lease(storage, run_dir, what="tans evaluate"))  # one writer per run
    storage.write_json(f"{run_dir}/run.json", {"fingerprint": fingerprint, "config": to_dict(cfg)})

    from jobs import runtime

    runtime.init_ray()
    extractor = build_extractor(retriever.extractor_spec)
    task_means = zoo_task_means(space_root, info)
    from tans.zoo.store import base_model_rel

    base_uri = space_root.uri_of(base_model_rel(space_root, info["zoo"]))
    records = []
    for i, (src, task, how) in enumerate(targets):
        for seed in cfg.seeds:
            rel = f"{paths.evaluation_targets_dir(run)}/{task}-s{seed}.json"
            if storage.is_file(rel) and not cfg.force:
                print(f"[evaluate] {task} seed {seed}: finished earlier ({storage.uri_of(rel)})", flush=True)
                records.append(storage.read_json(rel))
                continue
            t0 = time.perf_counter()
            record = evaluate_target(cfg, recipe, storage, run_dir, zoo, extractor, task_means, zoo_sources, base_uri,
                                     task, seed)
            record.update(src=src, how=how, seconds=round(time.perf_counter() - t0, 1))
            lease.check()
            storage.write_json(rel, record)
            records.append(record)
            _print_record(record, i + 1, len(targets))
    summary = summarise_methods([{"task": r["task"], "seed": r["seed"],
                                  "truth": {m: v["test_accuracy"] for m, v in r["ground_truth"].items()},
                                  "methods": r["methods"]} for r in records])
    evaluation = {"run": run, "settings": settings,
                  "space": {"run": info["run"], "zoo": info["zoo"], "uri": uri, "family": info.get("family")},
                  "targets": records, "summary": summary, "seconds": round(time.perf_counter() - t_start, 1),
                  "finished_at": datetime.now(UTC).isoformat(timespec="seconds")}
    md = evaluation_markdown(evaluation)
    storage.write_text(f"{run_dir}/evaluation.md", md)
    with tempfile.TemporaryDirectory() as tmp:
        png = os.path.join(tmp, "evaluation.png")
        plot_evaluation(evaluation, png)
        with open(png, "rb") as f:
            storage.write_bytes(f"{run_dir}/evaluation.png", f.read())
    lease.check()  # another writer took the run over: leave the result to it
    storage.write_json(f"{run_dir}/evaluation.json", evaluation)  # last: marks the evaluation as finished
    print(md.split("## Top-1 regret per task")[0].rstrip())
    print(f"[evaluate] done in {evaluation['seconds']:.0f}s -> {storage.uri_of(run_dir)}/evaluation.md", flush=True)
    return evaluation


def _print_record(record: dict, i: int, n: int) -> None:
    from tans.selection.metrics import per_record_metrics

    truth = {m: v["test_accuracy"] for m, v in record["ground_truth"].items()}
    per = per_record_metrics({"task": record["task"], "seed": record["seed"], "truth": truth,
                              "methods": record["methods"]})
    best = max(truth.values()) if truth else float("nan")
    parts = [f"{m} {100 * v['top1_regret']:.1f}" for m, v in per.items()
             if m in ("tans_search", "tans_predicted", "tans_similarity", "logme", "nearest_dataset")
             and v["top1_regret"] is not None]
    print(f"[evaluate] target {i}/{n} {record['task']} seed {record['seed']} ({record['seconds']:.0f}s): best in pool "
          f"{100 * best:.1f}%; top-1 regret (pts): {', '.join(parts)}", flush=True)


# -- command line -------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tans evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="evaluate config YAML (default: configs/evaluate/local.yaml)")
    p.add_argument("--dataset", action="append", help="a target (repeatable): ImageFolder, builtin:<task>, task name")
    p.add_argument("--root", help="storage root (default: $TANS_ROOT, else ~/.cache/tans)")
    p.add_argument("--space", help="space URI or run name (default: <root>/spaces/LATEST)")
    p.add_argument("--max-params", type=int, help="largest number of parameters a pool model may have (0: none)")
    p.add_argument("--max-flops", type=int, help="largest number of FLOPs a pool model may have (0: none)")
    p.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1")
    p.add_argument("--name", help="the run's name under evaluations/")
    p.add_argument("--force", action="store_true", help="redo finished targets")
    overrides, rest = split_overrides(argv, p)
    args = p.parse_args(rest)
    flags = {"root": args.root, "space": args.space, "max_params": args.max_params, "max_flops": args.max_flops,
             "name": args.name}
    args.overrides = overrides + [as_override(k, v) for k, v in flags.items() if v is not None]
    if args.dataset:
        args.overrides.append("datasets=" + json.dumps(list(args.dataset)))  # JSON is YAML: any path stays a string
    if args.seeds:
        args.overrides.append(f"seeds=[{args.seeds}]")
    args.overrides += ["force=true"] if args.force else []
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    cfg: EvaluateConfig = load_job_config("evaluate", args.config, args.overrides)
    evaluate(cfg, Storage(cfg.root or None))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))


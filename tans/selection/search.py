"""The ideas of a search, without Ray: datasets, candidate pools, baseline picks, the report.

``jobs/search.py`` runs a search on Ray (Tune trials for the fine-tunes); this module holds what
does not depend on where things run:

* :func:`prepare_dataset` turns SRC (an ImageFolder, ``builtin:<task>``, a task in the root)
  into a task in the storage root, and :func:`load_search_data` into seeded train / val / test
  tensors (val carved from train; test is the task's own test split, never used to select);
* the *pool* is every zoo model that meets the constraints; the baselines pick from it:
  ``random`` (seeded), ``nearest_dataset`` (best model of the zoo task whose mean extractor
  feature is closest to the target's), ``logme`` (best LogME score on the target's train
  features, over the pool or a seeded sample of at most P models);
* :class:`TrialSpec` describes one fine-tune (what, from which weights, for how long);
* :func:`summarise` and :func:`report_markdown` turn finished trials into the report.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import numpy as np

from tans.data.tasks import TaskError, check_task_name, read_task_info, task_exists
from tans.job_configs import BASELINES, SELECT_BY
from tans.storage import Storage


class SearchError(ValueError):
    """A search that cannot run as asked (one-line message)."""


# -- the dataset -------------------------------------------------------------------------------


def _task_name_for(src: str) -> str:
    base = src.rstrip("/").rsplit("/", 1)[-1] or "dataset"
    name = re.sub(r"[^a-z0-9_]+", "_", base.lower()).strip("_") or "dataset"
    return name if name[0].isalpha() else f"d_{name}"


def prepare_dataset(storage: Storage, src: str, image_size: int, ingest_cfg=None) -> tuple[str, str]:
    """(task name, how it got there) for ``src``; ingests it into ``storage`` when needed.

    ``src``: ``builtin:<task>``; ``task:<name>`` or a bare name of a task in the root; a local
    or ``s3://`` ImageFolder (ingested as task ``<folder name>``, reused if already there).
    """
    from tans.data.ingest import IngestError

    if not src:
        raise SearchError("--dataset is required (an ImageFolder, builtin:<task> or a task in the storage root)")
    if src.startswith("builtin:"):
        from tans.data.builtin import catalog

        specs = catalog.resolve(src)  # IngestError for an unknown name
        if len(specs) != 1:
            raise SearchError(f"{src} names {len(specs)} tasks; search one task at a time (e.g. {specs[0].task})")
        if task_exists(storage, specs[0].task):
            return specs[0].task, "in the storage root"
        catalog.materialise(storage, specs[0])
        return specs[0].task, "materialised from the built-in corpus"
    if src.startswith("task:") or ("/" not in src and ":" not in src and not src.startswith(".")):
        name = src.removeprefix("task:")
        try:
            check_task_name(name)
        except TaskError:
            raise SearchError(
                f"--dataset {src!r}: not a task name, and not a path (use ./{src} for a folder)"
            ) from None
        if not task_exists(storage, name):
            raise SearchError(f"--dataset {src!r}: no task {name!r} in {storage.uri} (and not a folder path)")
        return name, "in the storage root"
    from tans.data.ingest import ingest_imagefolder

    name = _task_name_for(src)
    if task_exists(storage, name):
        info = read_task_info(storage, name)
        if (info.source or "") == src:
            return name, "ingested earlier"
        raise SearchError(f"a task {name!r} from another source ({info.source}) is in {storage.uri}; "
                          "rename the folder or use task:<name>")
    try:
        report = ingest_imagefolder(storage, src, name, image_size=image_size, seed=0,
                                    config={"source": src, "image_size": image_size})
    except IngestError as exc:
        raise SearchError(str(exc)) from None
    return name, "ingested from an ImageFolder" + report.skipped_note("skipping")


@dataclass
class SearchData:
    """Seeded train / val (from train) / test tensors of one task, at the space's image size."""

    task: str
    classes: list[str]
    train: object
    val: object
    test: object
    channels: int

    def classes_missing(self) -> dict[str, list[str]]:
        """Split -> the classes with no image in it (a class of 1-2 images cannot be in all three)."""
        out = {}
        for split in ("train", "val", "test"):
            present = set(getattr(self, split).labels.tolist())
            missing = [c for i, c in enumerate(self.classes) if i not in present]
            if missing:
                out[split] = missing
        return out


def _subset(data, idx):
    from tans.selection.finetune import subset

    return subset(data, idx)


def load_search_data(storage: Storage, task: str, image_size: int, val_fraction: float, seed: int,
                     max_train_images: int = 0, max_test_images: int = 0) -> SearchData:
    """Decode the task and split it; checks it has >= 2 classes and enough images."""
    import torch

    from tans.data.reader import load_task_tensors
    from tans.selection.finetune import split_train_val

    info = read_task_info(storage, task)
    if info.num_classes < 2:
        raise SearchError(f"task {task!r} has {info.num_classes} class; a search needs at least 2")
    train_all = load_task_tensors(storage, task, "train", image_size, channels=3)
    test = load_task_tensors(storage, task, "test", image_size, channels=3)
    present = torch.unique(train_all.labels).numel()
    if present < 2:
        raise SearchError(f"task {task!r} has images of {present} class in its train split; a search needs 2")
    rng = np.random.default_rng(seed)
    if max_train_images and len(train_all) > max_train_images:
        # a stratified cap: the same share of every class
        tr, _ = split_train_val(train_all.labels.numpy(), 1.0 - max_train_images / len(train_all), seed)
        train_all = _subset(train_all, tr)
    if max_test_images and len(test) > max_test_images:
        test = _subset(test, np.sort(rng.choice(len(test), max_test_images, replace=False)))
    tr, va = split_train_val(train_all.labels.numpy(), val_fraction, seed)
    if len(va) == 0 or len(tr) < 2:
        raise SearchError(f"task {task!r}: {len(train_all)} train images are too few to carve a validation set")
    if len(test) == 0:
        raise SearchError(f"task {task!r} has no test images")
    return SearchData(task, list(info.classes), _subset(train_all, tr), _subset(train_all, va), test, info.channels)


# -- trials --------------------------------------------------------------------------------------


@dataclass
class TrialSpec:
    """One fine-tune: a zoo model (or an arch) from some weights, for some epochs, lr and seed."""

    trial: str  # unique name within the search, e.g. "cand0-lr0.01-s0"
    role: str  # "candidate", "oracle", or a baseline name
    model_id: str
    family: str
    arch: dict
    weights_uri: str | None  # None: random init
    epochs: int
    lr: float
    seed: int
    task: str = ""  # the zoo task of the model ("" for scratch)
    n_params: int = 0
    flops: int = 0
    similarity: float | None = None
    predicted_accuracy: float | None = None

    def key(self) -> tuple:
        """Two specs with the same key train the same network the same way (their results are shared)."""
        return (self.family, tuple(sorted((k, tuple(v)) for k, v in self.arch.items())), self.weights_uri,
                self.epochs, self.lr, self.seed)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrialResult:
    spec: TrialSpec
    status: str  # "finished" | "failed" | "stopped" (ASHA)
    val_accuracy: list[float] = field(default_factory=list)  # per epoch
    test_accuracy: list[float] = field(default_factory=list)
    error: str = ""
    seconds: float = 0.0
    checkpoint: str = ""  # where the last checkpoint is (for the winner's export)
    val_loss: list[float] = field(default_factory=list)  # per epoch (empty in records made before it was kept)

    @property
    def final_val(self) -> float | None:
        return self.val_accuracy[-1] if self.val_accuracy else None

    @property
    def final_val_loss(self) -> float | None:
        return self.val_loss[-1] if self.val_loss else None

    @property
    def final_test(self) -> float | None:
        return self.test_accuracy[-1] if self.test_accuracy else None


# -- baseline picks --------------------------------------------------------------------------------


def pick_random(pool: np.ndarray, n: int, seed: int) -> list[int]:
    """``n`` distinct rows of ``pool`` (row indices into the index), seeded."""
    rng = np.random.default_rng([seed, 7])
    return [int(i) for i in rng.choice(pool, size=min(n, len(pool)), replace=False)]


def pick_nearest_dataset(target_mean: np.ndarray, task_means: dict[str, np.ndarray], pool: np.ndarray,
                         tasks: np.ndarray, accuracy: np.ndarray) -> tuple[int, str, float]:
    """(row, zoo task, cosine) of the best pool model of the zoo task nearest to the target.

    Nearness is the cosine between mean extractor features; a task with no model in the pool is
    skipped for the next nearest one.
    """
    names = [t for t in task_means if np.any(tasks[pool] == t)]
    if not names:
        raise SearchError("no zoo task with a query has a model that meets the constraints")
    from tans.space.prior import task_cosines

    sims = task_cosines(target_mean, task_means, names)
    best_task = names[int(np.argmax(sims))]
    rows = pool[tasks[pool] == best_task]
    return int(rows[np.argmax(accuracy[rows])]), best_task, float(np.max(sims))


def _finetuned_phrase(settings: dict) -> str:
    """'4 of the top 4 candidates', or '3 of the top 4 candidates and the nearest dataset's best
    model (`id`)' when that model took the last fine-tune slot."""
    n, k, near = settings["finetune"], settings["top_k"], settings.get("nearest_candidate_added")
    if near:
        return f"{n - 1} of the top {k} candidates and the nearest dataset's best model (`{near}`)"
    return f"{n} of the top {k} candidates"


def finetune_list(retrieved: list[str], nearest: str | None, n: int) -> list[str]:
    """The models a search fine-tunes: the first ``n`` retrieved, except that the last slot goes to
    ``nearest`` (the nearest dataset's best model) when it is not among the first ``n`` already.

    ``nearest`` None or ``n`` < 2 leaves the retrieval's first ``n``. Retrieval alone misses the
    obvious neighbour's model on some tasks; one slot for it lowered the top-1 regret on the
    validation tasks (README "Evaluation").
    """
    first = list(retrieved[:n])
    if nearest is None or n < 2 or nearest in first:
        return first
    return first[: n - 1] + [nearest]


def logme_sample(pool: np.ndarray, max_models: int, seed: int) -> np.ndarray:
    """The pool, or a seeded sample of ``max_models`` of it (0 = the whole pool)."""
    if not max_models or len(pool) <= max_models:
        return np.asarray(pool)
    rng = np.random.default_rng([seed, 11])
    return np.sort(rng.choice(pool, size=max_models, replace=False))


# -- the report ------------------------------------------------------------------------------------


def _mean_std(values: list[float | None]) -> dict:
    arr = np.asarray([v for v in values if v is not None], dtype=float)
    if arr.size == 0:
        return {"test_accuracy": None, "std": None, "n": 0}
    return {"test_accuracy": float(arr.mean()), "std": float(arr.std()), "n": int(arr.size)}


def summarise_candidates(results: list[TrialResult]) -> list[dict]:
    """One entry per fine-tuned candidate model (seeds and lrs grouped), best-predicted first."""
    by_model: dict[tuple, list[TrialResult]] = {}
    for r in results:
        by_model.setdefault((r.spec.model_id, r.spec.lr), []).append(r)
    out = []
    for (model_id, lr), rs in by_model.items():
        s = rs[0].spec
        # val and test accuracies are recorded together, one of each per epoch
        ok = [r for r in rs if r.status != "failed" and r.val_accuracy and r.test_accuracy]
        entry = {
            "model_id": model_id, "task": s.task, "n_params": s.n_params, "flops": s.flops, "lr": lr,
            "similarity": s.similarity, "predicted_accuracy": s.predicted_accuracy,
            "val_accuracy": float(np.mean([r.val_accuracy[-1] for r in ok])) if ok else None,
            "val_loss": float(np.mean([r.val_loss[-1] for r in ok])) if ok and all(r.val_loss for r in ok) else None,
            "test_accuracy": float(np.mean([r.test_accuracy[-1] for r in ok])) if ok else None,
            "test_std": float(np.std([r.test_accuracy[-1] for r in ok])) if ok else None,
            "epoch_accuracy": [float(v) for v in np.mean([r.test_accuracy for r in ok], axis=0)] if ok else [],
            "epoch_val_accuracy": [float(v) for v in np.mean([r.val_accuracy for r in ok], axis=0)] if ok else [],
            "seeds": len(rs),
            "status": "finished" if len(ok) == len(rs) else ("failed" if not ok else "partly failed"),
            "errors": [r.error for r in rs if r.error],
            "trials": [r.spec.trial for r in rs],
        }
        out.append(entry)
    return out


def pick_by_validation(entries: list[tuple[str, float | None, float | None]], select_by: str) -> str | None:
    """The id chosen among ``(id, val_accuracy, val_loss)`` entries, given in the search's order
    (best-ranked candidate first): the highest validation accuracy or the lowest validation loss;
    ties go to the earlier entry. Entries without the measure are skipped; with ``val_loss``, if
    any accuracy-bearing entry lacks a loss (trials recorded before losses were kept), the choice
    falls back to accuracy for all, so that no candidate loses for want of a number. None when
    no entry has a validation accuracy.
    """
    if select_by not in SELECT_BY:
        raise ValueError(f"select_by must be one of {', '.join(SELECT_BY)}, got {select_by!r}")
    done = [(m, acc, loss) for m, acc, loss in entries if acc is not None]
    if not done:
        return None
    if select_by == "val_loss" and all(loss is not None for _, _, loss in done):
        score = [-float(loss) for _, _, loss in done]  # type: ignore[arg-type]
    else:
        score = [float(acc) for _, acc, _ in done]
    return done[int(np.argmax(score))][0]  # argmax: the first of equal scores


def choose_winner(candidates: list[dict], select_by: str = "val_accuracy") -> dict:
    """The candidate chosen on *validation* (never test) by ``select_by``
    (:func:`pick_by_validation`); ties go to the earlier, better-ranked candidate."""
    entries = [(str(i), c["val_accuracy"], c.get("val_loss")) for i, c in enumerate(candidates)]
    chosen = pick_by_validation(entries, select_by)
    if chosen is None:
        errors = "; ".join(e for c in candidates for e in c["errors"][:1])
        raise SearchError(f"every candidate's fine-tune failed ({errors[:300]})")
    return candidates[int(chosen)]


def baseline_entry(results: list[TrialResult], **extra) -> dict:
    ok = [r for r in results if r.status != "failed" and r.test_accuracy]
    entry = _mean_std([r.final_test for r in ok])
    entry["epoch_accuracy"] = [float(v) for v in np.mean([r.test_accuracy for r in ok], axis=0)] if ok else []
    entry["models"] = sorted({r.spec.model_id for r in results})
    entry["status"] = "finished" if len(ok) == len(results) else ("failed" if not ok else "partly failed")
    errors = [r.error for r in results if r.error]
    if errors:
        entry["errors"] = errors
    entry.update(extra)
    return entry


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def _loss(x) -> str:
    return "—" if x is None else f"{x:.3f}"


def _cell(entry: dict | None) -> str:
    if not entry or entry.get("test_accuracy") is None:
        return "—" if not entry else "failed"
    s = _pct(entry["test_accuracy"])
    if entry.get("n", 1) > 1:
        s += f" ± {100 * entry['std']:.1f}"
    return s


def report_markdown(report: dict) -> str:
    """report.md: the table a person reads first, then the candidates."""
    c = report["constraints"]
    lim = ", ".join(f"{k} ≤ {v:,}" for k, v in c.items() if v) or "none"
    w = report["winner"]
    lines = [
        f"# TANS search: {report['dataset']['task']}",
        "",
        f"Space `{report['space']['run']}` (zoo `{report['space']['zoo']}`), constraints: {lim}. "
        f"{report['dataset']['classes']} classes; train {report['dataset']['train']} / "
        f"val {report['dataset']['val']} / "
        f"test {report['dataset']['test']} images. Fine-tuned {_finetuned_phrase(report['settings'])} "
        f"for {report['settings']['epochs']} epoch(s), "
        f"{report['settings']['seeds']} seed(s); the winner is chosen on validation "
        f"{'loss' if report['settings'].get('select_by') == 'val_loss' else 'accuracy'}.",
        "",
        "| method | model | test accuracy (%) |",
        "|---|---|---|",
        f"| **TANS pick** | `{w['model_id']}` ({w['n_params']:,} params) | **{_cell(report['winner_result'])}** |",
    ]
    for name in (*BASELINES, "oracle"):
        b = report["baselines"].get(name)
        if b is None:
            continue
        models = ", ".join(f"`{m}`" for m in b.get("models", [])[:3])
        lines.append(f"| {name} | {models} | {_cell(b)} |")
    sel = report["selection_seconds"]
    logme = report["baselines"].get("logme")
    logme_time = (f", LogME {sel['logme']:.2f} s (scoring {logme.get('pool_scored', 0)} of {logme.get('pool_size', 0)} "
                  "pool models)") if sel.get("logme") is not None and logme else ""
    lines += [
        "",
        f"Search wall time {report['search_seconds']:.0f} s; selection time: TANS {sel['tans']:.2f} s{logme_time}.",
        "",
        "## Candidates (retrieved, best predicted first)",
        "",
        "| model | zoo task | params | MFLOPs | similarity | predicted | val | val loss | test | status |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cand in report["candidates"]:
        lines.append(
            f"| `{cand['model_id']}` | {cand['task']} | {cand['n_params']:,} | {cand['flops'] / 1e6:.1f} | "
            f"{cand['similarity']:.3f} | {_pct(cand['predicted_accuracy'])} | {_pct(cand['val_accuracy'])} | "
            f"{_loss(cand.get('val_loss'))} | {_pct(cand['test_accuracy'])} | {cand['status']} |")
    return "\n".join(lines) + "\n"


def plot_report(report: dict, path: str) -> None:
    """report.png: test accuracy per epoch (winner and baselines); predicted vs final accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    curves = [("TANS pick", report["winner_result"])] + [(k, v) for k, v in report["baselines"].items()]
    for name, entry in curves:
        ys = entry.get("epoch_accuracy") or []
        if ys:
            ax1.plot(range(1, len(ys) + 1), ys, marker="o", lw=2.5 if name == "TANS pick" else 1.2, label=name)
    ax1.set_xlabel("epoch"), ax1.set_ylabel("test accuracy"), ax1.set_title("fine-tuning curves")
    ax1.legend(fontsize=8)
    done = [c for c in report["candidates"] if c["test_accuracy"] is not None]
    ax2.scatter([c["predicted_accuracy"] for c in done], [c["test_accuracy"] for c in done])
    for c in done:
        ax2.annotate(c["model_id"][-6:], (c["predicted_accuracy"], c["test_accuracy"]), fontsize=7)
    ax2.set_xlabel("predicted accuracy (zoo scale)"), ax2.set_ylabel("test accuracy after fine-tuning")
    ax2.set_title("candidates: predicted vs final")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class SearchReport:
    """A finished search's report.json as an object (what ``jobs.api.search(...)`` returns)."""

    def __init__(self, report: dict):
        self.raw = report

    @property
    def winner(self) -> dict:
        return self.raw["winner"]

    @property
    def model_uri(self) -> str:
        return self.raw["winner"]["model_uri"]

    @property
    def test_accuracy(self) -> float | None:
        return self.raw["winner_result"]["test_accuracy"]

    @property
    def baselines(self) -> dict:
        return self.raw["baselines"]

    @property
    def candidates(self) -> list[dict]:
        return self.raw["candidates"]

    def load_model(self, device: str = "cpu"):
        """The exported winner, ready to predict (see :func:`tans.selection.export.load_model`)."""
        from tans.selection.export import load_model

        return load_model(self.model_uri, device=device)

    def to_markdown(self) -> str:
        return report_markdown(self.raw)

    def __repr__(self) -> str:
        w = self.winner
        return (f"SearchReport(task={self.raw['dataset']['task']!r}, winner={w['model_id']!r}, "
                f"test_accuracy={self.test_accuracy}, n_params={w['n_params']})")

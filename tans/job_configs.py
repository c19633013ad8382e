"""One typed config per job. YAML files in ``configs/<job>/<profile>.yaml`` fill these.

Profiles: ``tiny`` (tests, seconds), ``local`` (2 CPU cores), ``full`` (GPU clusters).
Defaults here are the ``local`` behaviour; a YAML only states what it changes or wants to show.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from tans.config import ConfigError, load_config
from tans.names import check_name, is_bare_name

REPO_ROOT = Path(__file__).resolve().parents[1]
# The top-level configs/ of the checkout is the source of truth; a built wheel carries a copy as
# tans/configs/ (setup.py), found when the package runs outside the checkout.
PACKAGED_CONFIG_DIR = Path(__file__).resolve().parent / "configs"
CONFIG_DIR = PACKAGED_CONFIG_DIR if PACKAGED_CONFIG_DIR.is_dir() else REPO_ROOT / "configs"

# The baselines a search can run beside the TANS pick (``SearchConfig.baselines``; defined here,
# where configs are checked without importing anything heavy; tans.selection.search uses it).
BASELINES = ("scratch", "scratch_matched", "generic", "random", "nearest_dataset", "logme")
# how a search chooses among the candidates it fine-tuned (tans.selection.search.pick_by_validation);
# the README's "Evaluation" says which one meta_val supported
SELECT_BY = ("val_accuracy", "val_loss")


@dataclass
class IngestConfig:
    """``tans data ingest``: turning a source into a task in the storage root."""

    root: str = ""  # storage root; "" means $TANS_ROOT, else ~/.cache/tans
    image_size: int = 0  # 0: built-in sources keep their native size, ImageFolders their first image's (<= 64 px)
    test_fraction: float = 0.2  # ImageFolder inputs: share of each class held out for test
    seed: int = 0  # seeds the ImageFolder train/test split
    part_rows: int = 5000  # rows per Parquet part
    ray_min_images: int = 20000  # ImageFolders with at least this many files decode on Ray Data
    ray_for_builtin: bool = False  # materialise several built-in tasks as parallel Ray tasks
    force: bool = False  # replace a task that already exists

    def validate(self) -> None:
        if self.image_size < 0 or (0 < self.image_size < 8) or self.image_size > 1024:
            raise ValueError(f"image_size must be 0 (native) or 8..1024, got {self.image_size}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be between 0 and 1, got {self.test_fraction}")
        if self.part_rows < 1:
            raise ValueError(f"part_rows must be >= 1, got {self.part_rows}")


@dataclass
class DemoConfig:
    """``tans demo``: the whole pipeline on the built-in corpus, on a local Ray."""

    root: str = ""  # storage root; "" means $TANS_ROOT, else ~/.cache/tans
    splits: str = "configs/splits/default.yaml"  # which tasks play which role
    zoo: str = "configs/zoo/local.yaml"  # the zoo config the demo builds ("" skips the zoo stage)
    space: str = "configs/space/local.yaml"  # the space config it trains on that zoo ("" skips it)
    search: str = "configs/search/local.yaml"  # the search config used on every meta_test task
    evaluate: str = "configs/evaluate/local.yaml"  # named under the table: the comparison with intervals
    max_params: int = 0  # the demo's constraint on every search (0: none)
    max_flops: int = 0
    data: IngestConfig = field(default_factory=IngestConfig)


@dataclass
class SplitsConfig:
    """Which tasks each stage may use (meta_train / meta_val / meta_test; README, "Splits")."""

    meta_train: list[str] = field(default_factory=list)  # base pretraining, zoo, space training
    meta_val: list[str] = field(default_factory=list)  # own supernet and zoo rows; measure generalisation
    meta_test: list[str] = field(default_factory=list)  # left out of everything; the demo searches on them

    def validate(self) -> None:
        seen: dict[str, str] = {}
        for role in ("meta_train", "meta_val", "meta_test"):
            tasks = getattr(self, role)
            for task in tasks:
                check_name(task, f"{role} task")
                if task in seen:
                    raise ValueError(f"{role}: task {task!r} is already in {seen[task]} (splits must be disjoint)")
                seen[task] = role
        if not self.meta_train:
            raise ValueError("meta_train: needs at least one task")

    def all_tasks(self) -> list[str]:
        return [*self.meta_train, *self.meta_val, *self.meta_test]

    def digest(self) -> str:
        """A short hash of the three lists, recorded by every artifact built from them."""
        blob = json.dumps([self.meta_train, self.meta_val, self.meta_test]).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


@dataclass
class PretrainConfig:
    """Base supernet pretraining on the pooled meta_train tasks (Ray Train, sandwich rule)."""

    epochs: int = 3  # passes over the pooled subset; a checkpoint after each
    images_per_task: int = 600  # seeded subset of each meta_train task's train split
    batch_size: int = 64
    lr: float = 0.05  # SGD, cosine schedule over all steps
    warmup_epochs: float = 0.0  # linear learning-rate warm-up over this many epochs, then the cosine
    momentum: float = 0.9
    weight_decay: float = 3e-5
    random_subnets: int = 1  # sandwich rule: largest + smallest + this many random subnets per step
    num_workers: int = 1  # Ray Train workers (DDP)
    cpus_per_worker: int = 2
    use_gpu: bool = False
    max_failures: int = 2  # worker failures Ray Train recovers from (restart from last checkpoint)
    init: str = ""  # "" random init; "ofa:<net_id>" or a checkpoint URI (local or s3://)
    precision: str = "fp32"  # "bf16": forward passes under bfloat16 autocast (losses, weights, BN stats fp32)


@dataclass
class FinetuneConfig:
    """Per-task supernet fine-tuning (one Ray task per task, sandwich rule)."""

    steps: int = 60  # optimizer steps per task
    batch_size: int = 64
    images_per_task: int = 1000  # seeded subset of the task's train split
    lr: float = 0.02
    random_subnets: int = 1
    cpus_per_task: float = 1.0
    gpus_per_task: float = 0.0
    precision: str = "fp32"  # "bf16": forward passes under bfloat16 autocast (losses, weights, BN stats fp32)


@dataclass
class MeasureConfig:
    """Subnet sampling and measurement (one Ray task per (task, subnet batch))."""

    subnets_per_task: int = 16  # always includes the largest and the smallest
    seed: int = 0  # seeds the architecture samples
    per_task_archs: bool = True  # each task its own sample (False: the same archs on every task)
    bn_batches: int = 4  # BatchNorm recalibration batches (train split)
    bn_batch_size: int = 64
    test_images: int = 1000  # cap on test images evaluated per subnet (seeded subset)
    probe_size: int = 16  # Gaussian probe batch for the functional embedding
    probe_seed: int = 0
    cpus_per_item: float = 1.0
    gpus_per_item: float = 0.0
    precision: str = "fp32"  # "bf16": the accuracy forward under bfloat16 autocast (BN recalibration, f_emb fp32)


@dataclass
class ZooConfig:
    """``tans build-zoo``: base supernet, per-task supernets, measured subnets -> zoo rows."""

    name: str = ""  # the zoo's name: <root>/zoo/<name>/ (e.g. local-ofa_mbv3_w1.0-48px)
    root: str = ""
    family: str = "ofa_mbv3_w1.0"
    image_size: int = 48
    splits: str = "configs/splits/default.yaml"
    tasks: list[str] = field(default_factory=list)  # empty: meta_train + meta_val of the splits
    pretrain_tasks: list[str] = field(default_factory=list)  # empty: meta_train of the splits
    seed: int = 0
    force: bool = False  # redo finished tasks
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    measure: MeasureConfig = field(default_factory=MeasureConfig)

    def validate(self) -> None:
        if not self.name:
            raise ValueError("name: every zoo needs a name (e.g. local-ofa_mbv3_w1.0-48px)")
        check_name(self.name, "name")
        for task in [*self.tasks, *self.pretrain_tasks]:
            check_name(task, "task")
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {self.image_size}")
        if self.measure.subnets_per_task < 2:
            raise ValueError("measure.subnets_per_task must be >= 2 (the largest and the smallest)")
        for part in ("pretrain", "finetune", "measure"):
            check_precision(getattr(self, part).precision, f"{part}.precision")


@dataclass
class ExtractorConfig:
    """The frozen feature extractor that turns images into query features (tans.space.features)."""

    kind: str = "supernet"  # "supernet": largest subnet of the zoo's base supernet; "resnet18": a checkpoint
    uri: str = ""  # checkpoint URI; "" for `supernet` means <root>/supernets/<zoo>/base/model.pt
    name: str = ""  # folder under <root>/queries/; "" derives one (e.g. <zoo>-largest)

    def validate(self) -> None:
        if self.name:
            check_name(self.name, "extractor.name")
        if self.kind not in ("supernet", "resnet18"):
            raise ValueError(f"kind must be supernet or resnet18, got {self.kind!r}")
        if self.kind == "resnet18" and not self.uri:
            raise ValueError("uri: a resnet18 extractor needs a checkpoint URI (local path or s3://)")


@dataclass
class QueriesConfig:
    """Query features: N images per class of each task's train split through the extractor (Ray Data)."""

    per_class: int = 20  # images per class stored per task (a step subsamples from these)
    seed: int = 0
    concurrency: int = 1  # extractor actors (each holds one copy of the model)
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    force: bool = False  # re-extract tasks whose query file exists

    def validate(self) -> None:
        if self.per_class < 1:
            raise ValueError(f"per_class must be >= 1, got {self.per_class}")
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")


@dataclass
class SpaceConfig:
    """``tans train-space``: query features, then the contrastive space (Ray Train), index, metrics."""

    name: str = ""  # the run: <root>/spaces/<name>/
    root: str = ""
    zoo: str = ""  # the zoo's name (<root>/zoo/<zoo>/)
    splits: str = "configs/splits/default.yaml"  # meta_train trains the space, meta_val picks the checkpoint
    extractor: ExtractorConfig = field(default_factory=ExtractorConfig)
    queries: QueriesConfig = field(default_factory=QueriesConfig)
    embed_dim: int = 128
    hidden: int = 256
    attention: bool = False  # attention pooling over classes on top of the mean
    predictor_hidden: int = 128
    # the model encoder also reads the mean query feature of each model's zoo task (what it was
    # trained on), so the space can relate a new dataset to the models' data; chosen on meta_val plus
    # held-out sources (README "Evaluation"). Spaces trained before the option load without it.
    task_features: bool = True
    steps: int = 600
    tasks_per_step: int = 0  # meta_train tasks per step; 0: all of them
    per_class: int = 10  # images per class in each step's fresh query subsample
    lr: float = 1e-3  # Adam
    weight_decay: float = 1e-4
    lam: float = 1.0  # weight of the predictor's MSE next to the contrastive loss
    # `tans evaluate` runs (names under <root>/evaluations/, on this zoo) whose targets are meta_train
    # tasks: their ground-truth fine-tunes teach the predictor how zoo models do once fine-tuned on
    # *other* tasks, which the zoo never measures (tans.space.transfer); [] = the zoo's accuracies only
    transfer_runs: list[str] = field(default_factory=list)
    transfer_weight: float = 1.0  # weight of those pairs' MSE
    margin: float = 0.2
    eval_every: int = 50  # steps between meta-val evaluations (each one a checkpoint)
    seed: int = 0
    num_workers: int = 1  # Ray Train workers (DDP when > 1)
    cpus_per_worker: int = 1
    use_gpu: bool = False
    max_failures: int = 1
    force: bool = False  # retrain even if the run is finished

    def validate(self) -> None:
        if not self.name:
            raise ValueError("name: every space run needs a name (e.g. local)")
        if not self.zoo:
            raise ValueError("zoo: name the zoo to train on (e.g. local-ofa_mbv3_w1.0-48px)")
        check_name(self.name, "name")
        check_name(self.zoo, "zoo")
        if self.steps < 1 or self.eval_every < 1:
            raise ValueError("steps and eval_every must be >= 1")
        if self.per_class < 1:
            raise ValueError(f"per_class must be >= 1, got {self.per_class}")
        if self.tasks_per_step == 1 or self.tasks_per_step < 0:
            raise ValueError("tasks_per_step must be 0 (all) or >= 2 (the other tasks are the negatives)")
        if self.margin < 0 or self.lam < 0 or self.transfer_weight < 0:
            raise ValueError("margin, lam and transfer_weight must be >= 0")
        for run in self.transfer_runs:
            check_name(run, "transfer_runs")


@dataclass
class SearchConfig:
    """``tans search``: retrieve under constraints, fine-tune the best few (Ray Tune), baselines, report."""

    name: str = ""  # the run: <root>/searches/<name>/; "" derives one from dataset and constraints
    root: str = ""
    space: str = ""  # a space URI or run name; "" = <root>/spaces/LATEST
    dataset: str = ""  # ImageFolder (local/s3://), builtin:<task>, or a task in the root
    max_params: int = 0  # 0: no limit
    max_flops: int = 0  # 0: no limit
    family: str = ""  # "" any family of the space
    top_k: int = 10  # retrieved candidates
    finetune: int = 3  # the first of them (after the optional re-ranking) that are fine-tuned
    rerank: bool = True  # re-rank the top-k by the performance predictor before choosing which to fine-tune
    # The last fine-tune slot goes to the nearest dataset's best model (when finetune >= 2 and it is
    # not already among them): chosen on meta_val plus 6 meta_train tasks of held-out sources (README).
    nearest_candidate: bool = True
    # > 0: retrieval ranks by z(predicted accuracy) + prior_weight * z(nearest-dataset score) over the
    # models that meet the constraints (tans.space.retrieval.blend_with_prior) instead of similarity
    # top-k + re-rank; 0: the space alone. 0.5 chosen on meta_val plus held-out sources (README).
    prior_weight: float = 0.5
    # what chooses among the fine-tuned candidates: the highest validation accuracy or the lowest
    # validation loss (tans.selection.search.pick_by_validation; ties: the better-ranked candidate)
    select_by: str = "val_accuracy"
    epochs: int = 3
    seeds: int = 1  # every fine-tune repeats with seeds seed..seed+seeds-1 (mean ± std)
    lrs: list[float] = field(default_factory=lambda: [0.02])  # grid: model and lr chosen together
    batch_size: int = 64
    weight_decay: float = 4e-5
    val_fraction: float = 0.2  # carved from train, seeded; the winner is chosen on it
    max_train_images: int = 1500  # stratified cap on train (before the val split); 0 = all
    max_test_images: int = 0
    query_per_class: int = 20  # images per class encoded as the query
    seed: int = 0
    oracle: bool = False  # also fine-tune every top-k candidate: the best test accuracy among them
    baselines: list[str] = field(default_factory=lambda: list(BASELINES))
    random_models: int = 3
    logme_pool: int = 32  # LogME scores at most this many pool models (seeded sample); 0 = all
    logme_images: int = 500  # train images whose features LogME scores
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    precision: str = "fp32"  # "bf16": fine-tuning forwards under bfloat16 autocast (losses, weights, BN stats fp32)
    asha: bool = False  # ASHA stops weak candidates early (candidates only, never baselines)
    asha_grace_epochs: int = 0  # epochs every candidate gets before ASHA may stop it; 0 = half the epochs
    max_failures: int = 2  # retries of a failed trial (a lost worker or node), each from its last checkpoint
    force: bool = False  # redo a finished search

    def validate(self) -> None:
        check_run_refs(self.name, self.space)
        if self.top_k < 1 or self.finetune < 1:
            raise ValueError("top_k and finetune must be >= 1")
        if not self.prior_weight >= 0:
            raise ValueError(f"prior_weight must be >= 0 (0: retrieval by the space alone), got {self.prior_weight}")
        if self.select_by not in SELECT_BY:
            raise ValueError(f"select_by must be {' or '.join(SELECT_BY)}, got {self.select_by!r}")
        if self.finetune > self.top_k:
            raise ValueError(f"finetune ({self.finetune}) cannot be larger than top_k ({self.top_k})")
        if self.epochs < 1 or self.seeds < 1:
            raise ValueError("epochs and seeds must be >= 1")
        if self.max_params < 0 or self.max_flops < 0:
            raise ValueError("max_params and max_flops must be >= 0 (0: no limit)")
        if not self.lrs or any(lr <= 0 for lr in self.lrs):
            raise ValueError("lrs must be a non-empty list of positive learning rates")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be between 0 and 1, got {self.val_fraction}")
        for b in self.baselines:
            if b not in BASELINES:
                raise ValueError(f"unknown baseline {b!r} (known: {', '.join(BASELINES)})")
        if self.cpus_per_trial <= 0 or self.gpus_per_trial < 0:
            raise ValueError("cpus_per_trial must be > 0 and gpus_per_trial >= 0")
        check_precision(self.precision, "precision")


@dataclass
class EvaluateConfig:
    """``tans evaluate``: the model-selection protocol (ground-truth fine-tunes over a pool, every selector)."""

    name: str = ""  # the run: <root>/evaluations/<name>/; "" = the space run's name
    root: str = ""
    space: str = ""  # a space URI or run name; "" = <root>/spaces/LATEST
    datasets: list[str] = field(default_factory=list)  # SRC as for `tans search`; empty: the splits' meta_test
    splits: str = ""  # where meta_test comes from; "" = the splits file the space was trained with
    search: str = "configs/search/demo.yaml"  # the fine-tune recipe (epochs, lr, data caps), used unchanged
    max_params: int = 4_000_000  # 0: no limit
    max_flops: int = 0
    seeds: list[int] = field(default_factory=lambda: [0, 1])  # each fixes split, samples, pool and fine-tunes
    pool_cap: int = 16  # pool = the constrained zoo, or a seeded stratified sample of this many; 0 = all
    methods: list[str] = field(default_factory=list)  # empty: every method (tans.selection.evaluation.METHODS)
    references: list[str] = field(default_factory=lambda: _all_references())  # every reference
    scratch_long_factor: int = 10  # scratch_long trains this many times the recipe's epochs (first seed only)
    cpus_per_trial: float = 0.0  # 0: the recipe's
    gpus_per_trial: float = -1.0  # < 0: the recipe's
    # "": the recipe's rule for tans_search's choice among its fine-tunes; val_accuracy or val_loss
    # judges the other rule over the same ground truth (records without val losses are measured again)
    select_by: str = ""
    force: bool = False  # redo finished targets

    def validate(self) -> None:
        from tans.selection.evaluation import METHODS, REFERENCES

        check_run_refs(self.name, self.space)
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be a non-empty list of distinct ints, got {self.seeds}")
        if self.pool_cap < 0 or self.pool_cap == 1:
            raise ValueError(f"pool_cap must be 0 (the whole constrained zoo) or >= 2, got {self.pool_cap}")
        if self.max_params < 0 or self.max_flops < 0:
            raise ValueError("max_params and max_flops must be >= 0 (0: no limit)")
        for m in self.methods:
            if m not in METHODS:
                raise ValueError(f"unknown method {m!r} (known: {', '.join(METHODS)})")
        for r in self.references:
            if r not in REFERENCES:
                raise ValueError(f"unknown reference {r!r} (known: {', '.join(REFERENCES)})")
        if self.scratch_long_factor < 1:
            raise ValueError(f"scratch_long_factor must be >= 1, got {self.scratch_long_factor}")
        if not self.search:
            raise ValueError("search: name the search config whose fine-tune recipe is the ground truth")
        if self.select_by and self.select_by not in SELECT_BY:
            raise ValueError(f"select_by must be {' or '.join(SELECT_BY)} (or empty: the recipe's), "
                             f"got {self.select_by!r}")


def _all_references() -> list[str]:
    """Every reference fine-tune of an evaluation (tans.selection.evaluation.REFERENCES, numpy only)."""
    from tans.selection.evaluation import REFERENCES

    return list(REFERENCES)


def check_precision(value: str, key: str) -> None:
    """``fp32`` or ``bf16`` (tans.zoo.elastic.PRECISIONS), else a one-line error naming ``key``."""
    if value not in ("fp32", "bf16"):
        raise ValueError(f"{key} must be fp32 or bf16, got {value!r}")


def check_run_refs(name: str, space: str) -> None:
    """A run's own name (when given) and a space given by bare run name must be valid names."""
    if name:
        check_name(name, "name")
    if space and is_bare_name(space):
        check_name(space, "space")


# job name -> config class: `configs/<job>/*.yaml` must load into it (tests check every file).
JOB_CONFIGS: dict[str, type] = {
    "data": IngestConfig,
    "demo": DemoConfig,
    "evaluate": EvaluateConfig,
    "search": SearchConfig,
    "space": SpaceConfig,
    "splits": SplitsConfig,
    "zoo": ZooConfig,
}


def resolve_config_path(path: str | Path) -> Path:
    """A config path as given; else ``configs/...`` (as configs name each other) from the project's configs."""
    p = Path(path)
    if p.exists() or p.is_absolute():
        return p
    parts = p.parts
    alt = CONFIG_DIR.joinpath(*parts[1:]) if parts and parts[0] == "configs" else CONFIG_DIR / p
    return alt if alt.exists() else p


def profiles(job: str) -> list[str]:
    """The profile names of ``job`` (``configs/<job>/<profile>.yaml``), e.g. tiny, local, full."""
    return sorted(f.stem for f in (CONFIG_DIR / job).glob("*.yaml"))


def load_job_config(job: str, path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()):
    """Load the config of ``job`` from ``path``: a YAML file, or a profile name such as ``tiny``
    (``configs/<job>/tiny.yaml``, wherever the package is installed). None: the ``local`` profile."""
    if job not in JOB_CONFIGS:
        raise ConfigError(f"unknown job {job!r}")
    if path is None:
        path = "local"
    if is_bare_name(str(path)) and not str(path).endswith((".yaml", ".yml")) and not Path(path).exists():
        profile = CONFIG_DIR / job / f"{path}.yaml"
        if not profile.is_file():
            raise ConfigError(f"{path}: no such config file or {job} profile (profiles: {', '.join(profiles(job))})")
        path = profile
    return load_config(JOB_CONFIGS[job], resolve_config_path(path), overrides)


def load_splits(path: str | Path) -> SplitsConfig:
    return load_config(SplitsConfig, resolve_config_path(path))

"""Does the zoo's pretraining pay? The pick of an evaluation, the zoo's generic base and scratch,
each trained for the same epochs with its learning rate chosen on validation.

    python bench/transfer_vs_scratch.py --root ROOT --evaluation RUN [--tasks T1,T2] [--seeds 0]
                                        [--epochs 3,12] [--lrs 0.02,0.05,0.1] [--threads 1] [--out FILE]

ROOT is a finished ``tans evaluate`` root; RUN names ``<root>/evaluations/RUN/evaluation.json``.
For every target (task x seed) of RUN (or those in ``--tasks``/``--seeds``), three starting
points are fine-tuned with the search recipe the evaluation used (its data caps, split and
batch size; ``tans.selection.finetune.finetune``: SGD, cosine schedule), for every budget in
``--epochs`` and every learning rate in ``--lrs``:

* ``pick``: the network ``tans_search`` picked in RUN (zoo weights),
* ``generic``: the same architecture from the zoo's base supernet (what a user gets without
  any selection),
* ``scratch``: the same architecture from random weights.

Per budget and starting point, the learning rate is chosen on the validation split (never on
test) and its test accuracy is reported. The question it answers is the product's: does a
pretrained pick, trained for E epochs, beat scratch trained for the same E epochs (the search
spends ``finetune x epochs`` epochs: compare the pick at ``epochs`` with scratch at that
product)? Choose tasks from meta_val when the answer is used to change a default.

Printed: one table per target and the mean over targets; ``--out`` writes the raw numbers (JSON).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from tans.job_configs import load_job_config
from tans.selection.finetune import build_candidate, finetune
from tans.selection.search import load_search_data
from tans.space.retrieval import Retriever
from tans.storage import Storage
from tans.zoo.store import base_model_rel
from tans.zoo.subnets import Arch


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True)
    p.add_argument("--evaluation", required=True, help="a finished evaluation run in ROOT/evaluations")
    p.add_argument("--tasks", default="", help="comma-separated; default: every target of the run")
    p.add_argument("--seeds", default="", help="comma-separated; default: every seed of the run")
    p.add_argument("--epochs", default="3,12")
    p.add_argument("--lrs", default="0.02,0.05,0.1")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="")
    return p.parse_args(argv)


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def run_target(storage, retriever, base_uri, recipe, record, epochs, lrs) -> dict:
    """Every (start, epochs, lr) for one target; returns {start: {epochs: {lr: (val, test)}}}."""
    ids = [str(m) for m in retriever.model_ids]
    table = retriever.index_table
    row = ids.index(record["methods"]["tans_search"]["pick"])
    arch = Arch.from_dict({k: table.column(k)[row].as_py() for k in ("ks", "e", "d")})
    family = table.column("family")[row].as_py()
    starts = {"pick": table.column("supernet_uri")[row].as_py(), "generic": base_uri, "scratch": None}
    seed = int(record["seed"])
    data = load_search_data(storage, record["task"], int(retriever.info["image_size"]), recipe["val_fraction"],
                            seed, recipe["max_train_images"], recipe["max_test_images"])
    out: dict = {}
    for start, weights in starts.items():
        for e in epochs:
            for lr in lrs:
                model = build_candidate(family, arch, len(data.classes), weights, seed)
                t = time.perf_counter()
                r = finetune(model, data.train, data.val, data.test, e, recipe["batch_size"], lr, seed,
                             weight_decay=recipe["weight_decay"])
                out.setdefault(start, {}).setdefault(str(e), {})[str(lr)] = {
                    "val": r.val_accuracy[-1], "test": r.test_accuracy[-1], "seconds": time.perf_counter() - t}
                print(f"  {record['task']} s{seed} {start:<8} {e:>3} epochs lr {lr:<5g} val {r.val_accuracy[-1]:.3f} "
                      f"test {r.test_accuracy[-1]:.3f}", flush=True)
    return out


def chosen_on_val(cell: dict) -> tuple[str, dict]:
    """The learning rate with the best validation accuracy (ties: the smaller lr) and its numbers."""
    lr = max(cell, key=lambda k: (cell[k]["val"], -float(k)))
    return lr, cell[lr]


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    storage = Storage(args.root)
    run = storage.read_json(f"evaluations/{args.evaluation}/evaluation.json")
    space_uri = run["space"]["uri"]
    retriever = Retriever.load(space_uri)
    space_root = Storage(space_uri[: space_uri.rindex("/spaces/")])
    base_uri = space_root.uri_of(base_model_rel(space_root, run["space"]["zoo"]))
    recipe = {**vars(load_job_config("search", run["settings"]["recipe"]["config"], [])),
              **run["settings"]["recipe"]}
    tasks = set(filter(None, args.tasks.split(",")))
    seeds = {int(s) for s in filter(None, args.seeds.split(","))}
    targets = [t for t in run["targets"] if (not tasks or t["task"] in tasks) and (not seeds or t["seed"] in seeds)]
    if not targets:
        print(f"error: no target of {args.evaluation} matches --tasks/--seeds", file=sys.stderr)
        return 2
    epochs, lrs = [int(e) for e in _floats(args.epochs)], _floats(args.lrs)
    results = []
    for record in targets:
        print(f"[bench] {record['task']} seed {record['seed']}: pick {record['methods']['tans_search']['pick']}",
              flush=True)
        results.append({"task": record["task"], "seed": record["seed"],
                        "runs": run_target(storage, retriever, base_uri, recipe, record, epochs, lrs)})
    print("\nTest accuracy, learning rate chosen on validation (mean over targets; lr per target in the JSON):")
    print("| start | " + " | ".join(f"{e} epochs" for e in epochs) + " |")
    print("|---|" + "---|" * len(epochs))
    for start in ("pick", "generic", "scratch"):
        cells = [100 * statistics.mean(chosen_on_val(r["runs"][start][str(e)])[1]["test"] for r in results)
                 for e in epochs]
        print(f"| {start} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"evaluation": args.evaluation, "epochs": epochs, "lrs": lrs, "targets": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

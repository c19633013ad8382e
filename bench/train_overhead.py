"""Ray Train's overhead per training step: one TorchTrainer worker vs the same loop in-process.

    python bench/train_overhead.py [--family ofa_mbv3_w1.0] [--image-size 48] [--batch-size 32]
                                   [--steps 12] [--warmup 3] [--threads N]

Both sides run the same plain step (forward, cross-entropy, backward, SGD) of the family's largest
subnet on the same synthetic batch, with ``torch.set_num_threads(N)`` (Ray gives its worker N CPUs
and sets OMP_NUM_THREADS=N; the in-process loop is pinned to N too). Warm-up steps are excluded
and each side reports its median step time, measured inside the loop, so worker-group start-up
(~30 s here) is not counted: this is the steady-state cost of training under Ray Train. The
in-process loop runs before and after the Ray run and the two are averaged, which cancels slow
drift from other load on a shared machine. Prints both timings and the ratio (target <= 1.10).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere as a script

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def step_times(config: dict, model: torch.nn.Module | None = None) -> list[float]:
    """Seconds per step of ``config['steps']`` timed steps after ``config['warmup']`` untimed ones."""
    from tans.supernets import get_family

    torch.set_num_threads(config["threads"])
    torch.manual_seed(0)
    if model is None:
        model = get_family(config["family"]).build(config["classes"])  # the largest subnet
    gen = torch.Generator().manual_seed(1)
    size = config["image_size"]
    images = torch.randn(config["batch_size"], 3, size, size, generator=gen)
    labels = torch.randint(0, config["classes"], (config["batch_size"],), generator=gen)
    device = next(model.parameters()).device
    images, labels = images.to(device), labels.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    times = []
    for i in range(config["warmup"] + config["steps"]):
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= config["warmup"]:
            times.append(time.perf_counter() - t0)
    return times


def ray_worker(config: dict) -> None:
    """The TorchTrainer worker: the same loop on a model prepared as the pretraining job does."""
    import ray.train
    import ray.train.torch

    from tans.supernets import get_family

    torch.manual_seed(0)
    model = ray.train.torch.prepare_model(get_family(config["family"]).build(config["classes"]))
    times = step_times(config, model)
    # Ray Train v2 keeps metrics only alongside a checkpoint: ship the timings in one.
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "times.json"), "w") as f:
            json.dump({"times": times, "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "")}, f)
        ray.train.report({}, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def run_ray(config: dict) -> tuple[list[float], str]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    with tempfile.TemporaryDirectory(prefix="tans-bench-") as tmp:
        trainer = TorchTrainer(
            ray_worker,
            train_loop_config=config,
            scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": config["threads"]}),
            torch_config=TorchConfig(backend="gloo"),
            run_config=RunConfig(name="train_overhead", storage_path=tmp),
        )
        result = trainer.fit()
        with result.checkpoint.as_directory() as d, open(os.path.join(d, "times.json")) as f:
            out = json.load(f)
    return out["times"], out["omp_num_threads"]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="ofa_mbv3_w1.0")
    parser.add_argument("--image-size", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                        help="torch threads = CPUs of the Ray worker")
    args = parser.parse_args(argv)
    config = {"family": args.family, "image_size": args.image_size, "batch_size": args.batch_size,
              "classes": args.classes, "steps": args.steps, "warmup": args.warmup, "threads": args.threads}

    from tans import runtime

    runtime.init_ray()
    time.sleep(5)  # let Ray's own processes finish starting: they compete for the same cores
    before = statistics.median(step_times(config))
    print(f"plain PyTorch (before): {before * 1000:.0f} ms/step", flush=True)
    ray_times, omp = run_ray(config)
    under_ray = statistics.median(ray_times)
    print(f"Ray Train, 1 worker:    {under_ray * 1000:.0f} ms/step (OMP_NUM_THREADS={omp})", flush=True)
    after = statistics.median(step_times(config))
    print(f"plain PyTorch (after):  {after * 1000:.0f} ms/step", flush=True)
    plain = (before + after) / 2
    print(f"{args.family} largest, {args.image_size}px, batch {args.batch_size}, {args.threads} threads, "
          f"{args.steps} steps after {args.warmup} warm-up (medians)")
    print(f"ratio Ray Train / plain = {under_ray / plain:.3f}  (target <= 1.10)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

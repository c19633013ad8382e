"""Ray Train's overhead per training step: one TorchTrainer worker vs the same loop in-process.

    python bench/train_overhead.py [--family ofa_mbv3_w1.0] [--image-size 48] [--batch-size 32]
                                   [--steps 15] [--warmup 3] [--threads N] [--ray-niceness]

Both sides run the same plain step (forward, cross-entropy, backward, SGD with momentum) of the
family's largest subnet on the same synthetic batch, with ``torch.set_num_threads(N)`` (Ray gives
its worker N CPUs and sets OMP_NUM_THREADS=N; the in-process loop is pinned to N too).

The two loops run in lock-step: the driver times one plain step, then lets the Ray worker time
one step (two small Ray queues pass the turn; the hand-over is outside the timed region), and so
on. Each side thus runs while the other waits, and both see the same background load: on a
shared 2-core machine, other jobs move step times by +-30% within a minute, which would swamp a
10% effect between two runs made one after the other. Warm-up steps (and the worker group's
~30 s start) are excluded; the ratio is of median step times (target <= 1.10).

Ray starts worker processes at niceness 15 (``RAY_worker_niceness``), so under load from other
processes a Ray worker gets a fraction of a core that a plain process at niceness 0 gets. That
is a scheduling policy, not a per-step cost, so the worker here runs at the driver's niceness;
``--ray-niceness`` keeps Ray's default to show its effect.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere as a script

import torch
import torch.nn.functional as F


class Stepper:
    """One model, one synthetic batch, one optimizer: ``step()`` trains once and returns seconds."""

    def __init__(self, config: dict, model: torch.nn.Module | None = None):
        from tans.zoo.supernets import get_family

        torch.set_num_threads(config["threads"])
        torch.manual_seed(0)
        self.model = model if model is not None else get_family(config["family"]).build(config["classes"])
        gen = torch.Generator().manual_seed(1)
        size, n = config["image_size"], config["batch_size"]
        self.device = next(self.model.parameters()).device
        self.images = torch.randn(n, 3, size, size, generator=gen).to(self.device)
        self.labels = torch.randint(0, config["classes"], (n,), generator=gen).to(self.device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.model.train()

    def step(self) -> float:
        t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(self.model(self.images), self.labels).backward()
        self.optimizer.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0


def ray_worker(config: dict) -> None:
    """The TorchTrainer worker: the same step on a model prepared as the pretraining job does."""
    import ray.train
    import ray.train.torch

    from tans.zoo.supernets import get_family

    torch.manual_seed(0)
    stepper = Stepper(config, ray.train.torch.prepare_model(get_family(config["family"]).build(config["classes"])))
    go, done = config["go"], config["done"]
    done.put({"ready": True, "omp_num_threads": os.environ.get("OMP_NUM_THREADS", ""),
              "niceness": os.getpriority(os.PRIO_PROCESS, 0), "threads": torch.get_num_threads()})
    while go.get() is not None:
        done.put(stepper.step())
    ray.train.report({})


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="ofa_mbv3_w1.0")
    parser.add_argument("--image-size", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--steps", type=int, default=15, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first, per side")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                        help="torch threads = CPUs of the Ray worker")
    parser.add_argument("--ray-niceness", action="store_true", help="keep Ray's worker niceness (15)")
    args = parser.parse_args(argv)
    config = {"family": args.family, "image_size": args.image_size, "batch_size": args.batch_size,
              "classes": args.classes, "threads": args.threads}

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.util.queue import Queue

    from jobs import runtime

    runtime.init_ray()
    go, done = Queue(actor_options={"num_cpus": 0}), Queue(actor_options={"num_cpus": 0})
    env = None if args.ray_niceness else {"env_vars": {"RAY_worker_niceness": str(os.getpriority(os.PRIO_PROCESS, 0))}}
    failure: list[BaseException] = []
    with tempfile.TemporaryDirectory(prefix="tans-bench-") as tmp:
        trainer = TorchTrainer(
            ray_worker,
            train_loop_config={**config, "go": go, "done": done},
            scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": args.threads}),
            torch_config=TorchConfig(backend="gloo"),
            run_config=RunConfig(name="train_overhead", storage_path=tmp, worker_runtime_env=env),
        )

        def fit() -> None:
            try:
                trainer.fit()
            except BaseException as exc:  # reported by the main thread
                failure.append(exc)
                done.put(None)

        fitter = threading.Thread(target=fit, daemon=True)
        fitter.start()
        plain = Stepper(config)
        info = done.get(timeout=600)  # the worker is up and has built its model
        if not isinstance(info, dict):
            raise RuntimeError(f"the Ray Train worker failed: {failure[0] if failure else 'unknown error'}")
        plain_times, ray_times = [], []
        for i in range(args.warmup + args.steps):
            p = plain.step()
            go.put(i)
            r = done.get(timeout=600)
            if r is None:
                raise RuntimeError(f"the Ray Train worker failed: {failure[0] if failure else 'unknown error'}")
            if i >= args.warmup:
                plain_times.append(p)
                ray_times.append(r)
        go.put(None)
        fitter.join(timeout=120)

    p_med, r_med = statistics.median(plain_times), statistics.median(ray_times)
    pair = statistics.median(r / p for r, p in zip(ray_times, plain_times))
    print(f"{args.family} largest, {args.image_size}px, batch {args.batch_size}, {args.threads} threads; "
          f"{args.steps} timed steps per side after {args.warmup} warm-up, in lock-step")
    print(f"plain PyTorch in-process: {p_med * 1000:.0f} ms/step (median; min {min(plain_times) * 1000:.0f})")
    print(f"Ray Train, 1 worker:      {r_med * 1000:.0f} ms/step (median; min {min(ray_times) * 1000:.0f}; "
          f"OMP_NUM_THREADS={info['omp_num_threads']}, torch threads {info['threads']}, niceness {info['niceness']})")
    print(f"median of per-step ratios: {pair:.3f}")
    print(f"ratio Ray Train / plain = {r_med / p_med:.3f}  (target <= 1.10)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

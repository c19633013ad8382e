"""Masked top-k retrieval vs a bare ``matmul + topk`` over the same synthetic index.

    python bench/retrieve.py [--rows 1000000] [--dim 128] [--k 10] [--repeats 15] [--warmup 3]
                             [--threads 1]

A synthetic index of unit rows (``--rows`` x ``--dim``, float32) with random n_params/flops
columns; a ``max_params`` limit at the median keeps ~50% of the rows. Three things are timed in
lock-step (one repeat of each in turn, so both see the same background load on a shared machine):

- bare:   ``torch.topk(index @ q, k)``
- masked: ``topk_cosine(q, index, k, mask)`` with a precomputed mask (what the ratio reports)
- full:   ``constraint_mask(...)`` from the numpy columns + ``topk_cosine`` (a Retriever's path
          per query, minus the query encoder)

Warm-up repeats are excluded; times are medians. Target: masked / bare <= 1.5. The same is then
timed on a 14,000-row index (TANS's zoo size), for the absolute numbers.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere as a script

import numpy as np
import torch

from tans.space.retrieval import constraint_mask, topk_cosine


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(rows: int, dim: int, k: int, repeats: int, warmup: int, seed: int = 0) -> dict[str, float]:
    """Median seconds of bare, masked and full retrieval over one synthetic index."""
    g = torch.Generator().manual_seed(seed)
    index = torch.nn.functional.normalize(torch.randn(rows, dim, generator=g), dim=1)
    rng = np.random.default_rng(seed)
    n_params = rng.integers(100_000, 10_000_000, rows)
    flops = rng.integers(1_000_000, 600_000_000, rows)
    limit = int(np.median(n_params))
    mask = torch.from_numpy(constraint_mask(n_params, flops, max_params=limit))
    queries = torch.nn.functional.normalize(torch.randn(repeats + warmup, dim, generator=g), dim=1)

    times: dict[str, list[float]] = {"bare": [], "masked": [], "full": []}
    for i, q in enumerate(queries):
        t_bare = _timed(lambda q=q: torch.topk(index @ q, k))
        t_masked = _timed(lambda q=q: topk_cosine(q, index, k, mask))
        t_full = _timed(
            lambda q=q: topk_cosine(q, index, k, torch.from_numpy(constraint_mask(n_params, flops, max_params=limit)))
        )
        if i >= warmup:
            times["bare"].append(t_bare)
            times["masked"].append(t_masked)
            times["full"].append(t_full)
    # sanity: the masked result is the brute-force answer over the survivors
    q = queries[0]
    idx, _ = topk_cosine(q, index, k, mask)
    sims = (index @ q).masked_fill(~mask, float("-inf"))
    assert torch.equal(idx, torch.argsort(sims, descending=True, stable=True)[:k])
    out = {name: statistics.median(ts) for name, ts in times.items()}
    out["kept"] = float(mask.float().mean())
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    big = run(args.rows, args.dim, args.k, args.repeats, args.warmup)
    small = run(14_000, args.dim, args.k, args.repeats * 4, args.warmup)
    print(f"torch {torch.__version__}, {args.threads} thread(s), dim {args.dim}, k {args.k}, "
          f"median of {args.repeats} repeats after {args.warmup} warm-up")
    for name, r in ((f"{args.rows:,} rows", big), ("14,000 rows", small)):
        print(f"{name:>16}: bare matmul+topk {r['bare'] * 1e3:8.3f} ms | masked top-k {r['masked'] * 1e3:8.3f} ms "
              f"| mask built per query + top-k {r['full'] * 1e3:8.3f} ms | kept {r['kept']:.1%}")
    ratio = big["masked"] / big["bare"]
    print(f"ratio masked / bare ({args.rows:,} rows): {ratio:.3f} (target <= 1.5); "
          f"with the mask built per query: {big['full'] / big['bare']:.3f}")
    return 0 if ratio <= 1.5 else 1


if __name__ == "__main__":
    sys.exit(main())

"""Cost of measuring one subnet vs the bare forward passes it contains.

    python bench/zoo_measure.py [--family ofa_mbv3_w1.0] [--image-size 48] [--archs 4]
                                [--bn-batches 4] [--bn-batch-size 64] [--test-images 1000] [--threads 1]

Measuring a subnet (``tans.zoo.measure.measure_subnet``) = BatchNorm recalibration over the BN
batches + evaluation over the test images + the probe batch for the functional embedding, plus
the parameter/FLOP counts. Its floor is the forward passes themselves: the same batches through
the same subnet under ``no_grad``. This prints both times per architecture and the ratio of the
medians (target <= 1.3). The two are timed alternately, arch by arch, so background load on a
shared machine hits both alike. Counts are cached per architecture after the first task, so the
first (uncached) measurement of each arch is reported separately.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tans.zoo.measure import measure_subnet, probe_batch
from tans.zoo.subnets import sample_archs, set_arch
from tans.zoo.supernets import forward_features, get_family


def bare_forwards(model, arch, bn_batches, test_batches, probe) -> None:
    """The forward passes measure_subnet contains, and nothing else."""
    set_arch(model, arch)
    with torch.no_grad():
        model.train()
        for x in bn_batches:
            forward_features(model, x)
        model.eval()
        for x, _ in test_batches:
            model(x)
        forward_features(model, probe)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", default="ofa_mbv3_w1.0")
    p.add_argument("--image-size", type=int, default=48)
    p.add_argument("--archs", type=int, default=4)
    p.add_argument("--bn-batches", type=int, default=4)
    p.add_argument("--bn-batch-size", type=int, default=64)
    p.add_argument("--test-images", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    family = get_family(args.family)
    model = family.build(10)
    s = args.image_size
    bn = [torch.randn(args.bn_batch_size, 3, s, s) for _ in range(args.bn_batches)]
    test = [
        (
            torch.randn(min(256, args.test_images - i), 3, s, s),
            torch.randint(0, 10, (min(256, args.test_images - i),)),
        )
        for i in range(0, args.test_images, 256)
    ]
    probe = probe_batch(16, s, 0)
    archs = sample_archs(family, args.archs, seed=0)

    # first pass: counts not cached yet (as for the first task of a zoo build)
    t0 = time.perf_counter()
    measure_subnet(model, archs[0], bn, test, s, probe)
    first = time.perf_counter() - t0

    measured, bare = [], []
    for arch in archs:
        t0 = time.perf_counter()
        bare_forwards(model, arch, bn, test, probe)
        bare.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        measure_subnet(model, arch, bn, test, s, probe)
        measured.append(time.perf_counter() - t0)
    print(f"{family.name} at {s}px, {args.bn_batches}x{args.bn_batch_size} BN images, {args.test_images} test images, "
          f"{args.threads} thread(s)")
    for arch, m, b in zip(archs, measured, bare):
        print(f"  d={list(arch.d)}  measure {m:6.2f}s  bare forwards {b:6.2f}s  ratio {m / b:.2f}")
    ratio = statistics.median(measured) / statistics.median(bare)
    print(f"first measurement (uncached counts): {first:.2f}s")
    print(f"median measure {statistics.median(measured):.2f}s / median bare forwards {statistics.median(bare):.2f}s "
          f"= ratio {ratio:.2f} (target <= 1.3)")


if __name__ == "__main__":
    main()

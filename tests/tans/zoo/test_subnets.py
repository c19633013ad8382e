"""Architectures: canonical form, deterministic sampling, stable ids, setting them on a supernet."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys

import pytest
import torch

from tans.zoo.subnets import (
    Arch,
    largest,
    model_id,
    random_arch,
    sample_archs,
    set_arch,
    smallest,
    task_arch_seed,
    task_archs,
)
from tans.zoo.supernets import get_family

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

SAMPLE_SCRIPT = """
import json
from tans.zoo.subnets import model_id, sample_archs, task_archs
from tans.zoo.supernets import get_family
out = {}
for name in ("ofa_mbv3_w1.0", "ofa_mbv3_tiny"):
    archs = sample_archs(get_family(name), 12, seed=7)
    out[name] = [[a.to_dict(), model_id(name, "fashion_0_5", a)] for a in archs]
    out[name + "/per_task"] = [a.to_dict() for a in task_archs(get_family(name), 6, 7, "greek_0_10")]
print(json.dumps(out))
"""


def _start_sampler(hash_seed: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}  # different str hashing: ids must not depend on it
    return subprocess.Popen([sys.executable, "-c", SAMPLE_SCRIPT], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=100)
    assert proc.returncode == 0, err
    return json.loads(out)


@pytest.mark.timeout(120)
def test_sample_archs_identical_across_processes():
    procs = [_start_sampler("1"), _start_sampler("2")]  # concurrently: half the wall time
    first, second = (_result(p) for p in procs)
    assert first == second
    here = [[a.to_dict(), model_id("ofa_mbv3_w1.0", "fashion_0_5", a)]
            for a in sample_archs(get_family("ofa_mbv3_w1.0"), 12, seed=7)]
    assert first["ofa_mbv3_w1.0"] == here
    per_task = [a.to_dict() for a in task_archs(get_family("ofa_mbv3_w1.0"), 6, 7, "greek_0_10")]
    assert first["ofa_mbv3_w1.0/per_task"] == per_task  # per-task samples do not depend on str hashing


@pytest.mark.timeout(30)
def test_task_archs_differ_between_tasks_and_keep_extremes():
    fam = get_family("ofa_mbv3_w1.0")
    a, b = task_archs(fam, 8, 0, "greek_0_10"), task_archs(fam, 8, 0, "latin_0_10")
    assert a[:2] == b[:2] == [largest(fam), smallest(fam)]
    assert len(set(a[2:]) & set(b[2:])) == 0  # the random part is each task's own
    assert task_archs(fam, 8, 0, "greek_0_10") == a  # reproducible
    assert task_archs(fam, 8, 1, "greek_0_10")[2:] != a[2:]  # and the zoo seed still matters
    shared = task_archs(fam, 8, 0, "greek_0_10", per_task=False)
    assert shared == task_archs(fam, 8, 0, "latin_0_10", per_task=False) == sample_archs(fam, 8, 0)
    assert task_arch_seed(0, "greek_0_10") != task_arch_seed(0, "latin_0_10")
    assert 0 <= task_arch_seed(10**12, "x") < 2**31


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", ["ofa_mbv3_w1.0", "ofa_mbv3_tiny"])
def test_sample_archs_largest_smallest_distinct_and_valid(name):
    fam = get_family(name)
    archs = sample_archs(fam, 40, seed=0)
    assert archs[0] == largest(fam) and archs[1] == smallest(fam)
    assert len(set(archs)) == 40
    for arch in archs:
        arch.check(fam)
    assert sample_archs(fam, 10, seed=0) == archs[:10]  # a prefix of a longer sample
    assert sample_archs(fam, 10, seed=1)[2:] != archs[2:10]
    assert sample_archs(fam, 1, seed=0) == [largest(fam)]
    with pytest.raises(ValueError):
        sample_archs(fam, 0, seed=0)


@pytest.mark.timeout(30)
def test_largest_and_smallest_vectors():
    fam = get_family("ofa_mbv3_w1.0")
    assert largest(fam).to_dict() == {"ks": [7] * 20, "e": [6] * 20, "d": [4] * 5}
    small = smallest(fam).to_dict()
    assert small["d"] == [2] * 5 and small["ks"] == [3, 3, 0, 0] * 5 and small["e"] == [3, 3, 0, 0] * 5
    tiny = largest(get_family("ofa_mbv3_tiny")).to_dict()  # depth 3 at most: the 4th slot is always empty
    assert tiny["ks"] == [5, 5, 5, 0] * 5 and tiny["e"] == [4, 4, 4, 0] * 5 and tiny["d"] == [3] * 5


@pytest.mark.timeout(30)
def test_canonical_form_makes_equal_networks_equal():
    ks = [3, 5, 7, 7] * 5
    e = [4, 6, 3, 3] * 5
    d = (2, 3, 4, 2, 3)
    a = Arch(ks=tuple(ks), e=tuple(e), d=d)
    ks_b, e_b = list(ks), list(e)
    ks_b[2], e_b[3], ks_b[19] = 5, 6, 3  # slots beyond their stage's depth: not part of the network
    b = Arch(ks=ks_b, e=e_b, d=list(d))
    assert a == b and hash(a) == hash(b)
    assert model_id("ofa_mbv3_w1.0", "t", a) == model_id("ofa_mbv3_w1.0", "t", b)
    assert a.ks[2:4] == (0, 0) and a.e[2:4] == (0, 0) and a.ks[4:7] == (3, 5, 7)
    c = Arch(ks=tuple([5] + ks[1:]), e=tuple(e), d=d)  # an active slot changed
    assert c != a and model_id("ofa_mbv3_w1.0", "t", c) != model_id("ofa_mbv3_w1.0", "t", a)
    assert Arch.from_dict(json.loads(json.dumps(a.to_dict()))) == a
    with pytest.raises(ValueError):
        Arch(ks=(3,) * 19, e=(3,) * 20, d=(2,) * 5)
    with pytest.raises(ValueError, match="does not fit"):
        Arch(ks=(9,) * 20, e=(3,) * 20, d=(2,) * 5).check(get_family("ofa_mbv3_w1.0"))


@pytest.mark.timeout(30)
def test_model_id_is_url_safe_and_depends_on_family_task_arch():
    fam = get_family("ofa_mbv3_w1.0")
    a, b = sample_archs(fam, 3, seed=0)[1:]
    mid = model_id(fam.name, "fashion_0_5", a)
    assert re.fullmatch(r"ofa_mbv3_w1\.0-fashion_0_5-[0-9a-f]{10}", mid)
    assert len({mid, model_id(fam.name, "fashion_5_10", a), model_id("ofa_mbv3_w1.2", "fashion_0_5", a),
                model_id(fam.name, "fashion_0_5", b)}) == 4
    odd = model_id(fam.name, "my task/ü", a)
    assert re.fullmatch(r"[A-Za-z0-9._-]+", odd)


@pytest.mark.timeout(30)
def test_random_arch_uses_a_fixed_number_of_draws():
    fam = get_family("ofa_mbv3_tiny")
    r1, r2 = random.Random(3), random.Random(3)
    random_arch(fam, r1)
    random_arch(fam, r2)
    assert r1.random() == r2.random()


@pytest.mark.timeout(30)
def test_set_arch_maps_slots_onto_the_supernet_blocks():
    fam = get_family("ofa_mbv3_tiny")
    model = fam.build(4)
    ks = [3, 5, 3, 0] * 5
    e = [4, 3, 3, 0] * 5
    arch = Arch(ks=tuple(ks), e=tuple(e), d=(2, 3, 2, 3, 2))
    set_arch(model, arch)
    assert model.runtime_depth == [2, 3, 2, 3, 2]
    stage2 = model.block_group_info[1]  # blocks of the second stage: slots 4..7 of the vectors
    assert [model.blocks[i].conv.active_kernel_size for i in stage2] == [3, 5, 3]
    assert [model.blocks[i].conv.active_expand_ratio for i in stage2] == [4, 3, 3]
    assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    with pytest.raises(ValueError, match="lacks"):
        set_arch(model, largest(get_family("ofa_mbv3_w1.0")))

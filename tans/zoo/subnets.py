"""Subnet architectures of a supernet family: sampling, canonical form, stable ids.

An :class:`Arch` is OFA's ``(ks, e, d)`` written as 5 stages x 4 block slots: ``ks[20]`` and
``e[20]`` per slot (stage-major), ``d[5]`` per stage. Families whose largest depth is below 4
(``ofa_mbv3_tiny``) simply never use the last slot of a stage, so every family shares one row
schema.

Canonical form: a slot at or beyond its stage's depth is not part of the network, so its ``ks``
and ``e`` are set to **0** (read: "no block here"). Two archs that build the same network are
then equal and get the same :func:`model_id`, and a topology encoder sees absent blocks
explicitly (OFA's own arch encoder also leaves them all-zero). :func:`set_arch` never hands a 0
to OFA: absent slots keep a valid (the largest) choice.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import zlib
from dataclasses import dataclass
from typing import Any

import torch

from tans.zoo.supernets import N_STAGES, SLOTS_PER_STAGE, SupernetFamily, unwrap

N_SLOTS = N_STAGES * SLOTS_PER_STAGE
ID_HASH_CHARS = 10


@dataclass(frozen=True)
class Arch:
    """A subnet: kernel sizes and expand ratios per slot, depth per stage (always canonical)."""

    ks: tuple[int, ...]
    e: tuple[int, ...]
    d: tuple[int, ...]

    def __post_init__(self):
        ks, e, d = (tuple(int(v) for v in seq) for seq in (self.ks, self.e, self.d))
        if len(ks) != N_SLOTS or len(e) != N_SLOTS or len(d) != N_STAGES:
            raise ValueError(f"an arch needs ks[{N_SLOTS}], e[{N_SLOTS}], d[{N_STAGES}]; "
                             f"got {len(ks)}, {len(e)}, {len(d)}")
        if any(not 1 <= depth <= SLOTS_PER_STAGE for depth in d):
            raise ValueError(f"depths must be between 1 and {SLOTS_PER_STAGE}, got {list(d)}")
        ks_slots, e_slots = list(ks), list(e)
        for i in range(N_SLOTS):
            if i % SLOTS_PER_STAGE >= d[i // SLOTS_PER_STAGE]:
                ks_slots[i] = e_slots[i] = 0  # absent block: canonical value
        # frozen dataclass: canonicalise in place once, so equality and hashing see the canonical form
        object.__setattr__(self, "ks", tuple(ks_slots))
        object.__setattr__(self, "e", tuple(e_slots))
        object.__setattr__(self, "d", d)

    def to_dict(self) -> dict[str, list[int]]:
        """``{"ks": [...20], "e": [...20], "d": [...5]}`` (the zoo row's columns)."""
        return {"ks": list(self.ks), "e": list(self.e), "d": list(self.d)}

    @classmethod
    def from_dict(cls, data: dict) -> Arch:
        """Inverse of :meth:`to_dict` (accepts lists or tuples)."""
        return cls(ks=tuple(data["ks"]), e=tuple(data["e"]), d=tuple(data["d"]))

    def check(self, family: SupernetFamily) -> Arch:
        """Raise ``ValueError`` unless every present block uses one of ``family``'s choices."""
        bad = [f"d={v}" for v in self.d if v not in family.d_choices]
        for i in range(N_SLOTS):
            if self.ks[i] == 0:
                continue
            if self.ks[i] not in family.ks_choices:
                bad.append(f"ks[{i}]={self.ks[i]}")
            if self.e[i] not in family.e_choices:
                bad.append(f"e[{i}]={self.e[i]}")
        if bad:
            raise ValueError(f"arch does not fit family {family.name}: {', '.join(bad[:5])}")
        return self


def _uniform(family: SupernetFamily, ks: int, e: int, d: int) -> Arch:
    return Arch(ks=(ks,) * N_SLOTS, e=(e,) * N_SLOTS, d=(d,) * N_STAGES)


def largest(family: SupernetFamily) -> Arch:
    """The largest subnet: largest kernel, expand ratio and depth everywhere."""
    return _uniform(family, max(family.ks_choices), max(family.e_choices), family.max_depth)


def smallest(family: SupernetFamily) -> Arch:
    """The smallest subnet: smallest kernel, expand ratio and depth everywhere."""
    return _uniform(family, min(family.ks_choices), min(family.e_choices), min(family.d_choices))


def random_arch(family: SupernetFamily, rng: random.Random) -> Arch:
    """A uniformly sampled arch; draws a fixed number of values from ``rng`` (reproducible)."""
    # Draw for all 20 slots even if absent, so the stream of draws never depends on the depths.
    ks = [rng.choice(family.ks_choices) for _ in range(N_SLOTS)]
    e = [rng.choice(family.e_choices) for _ in range(N_SLOTS)]
    d = [rng.choice(family.d_choices) for _ in range(N_STAGES)]
    return Arch(ks=tuple(ks), e=tuple(e), d=tuple(d))


def sample_archs(family: SupernetFamily, m: int, seed: int) -> list[Arch]:
    """``m`` distinct archs: ``[0]`` the largest, ``[1]`` the smallest, the rest random.

    Deterministic in ``(family, m, seed)`` across runs and processes (``random.Random(seed)``
    with an int seed), and a prefix of a longer sample with the same seed.
    """
    if m < 1:
        raise ValueError(f"need at least one subnet, got m={m}")
    archs = [largest(family), smallest(family)][:m]
    seen = set(archs)
    rng = random.Random(seed)
    tries = 0
    while len(archs) < m:
        arch = random_arch(family, rng)
        tries += 1
        if arch not in seen:
            seen.add(arch)
            archs.append(arch)
        elif tries > 1000 * m:
            raise ValueError(f"could not find {m} distinct archs in family {family.name}")
    return archs


def task_arch_seed(seed: int, task: str) -> int:
    """A seed for ``task``'s own architecture sample: stable across runs, processes and machines.

    ``hash()`` is salted per process, so the task name goes through CRC-32 instead.
    """
    return (int(seed) * 1_000_003 + zlib.crc32(task.encode("utf-8"))) % (2**31)


def task_archs(family: SupernetFamily, m: int, seed: int, task: str, per_task: bool = True) -> list[Arch]:
    """The ``m`` architectures measured on zoo task ``task``.

    ``per_task``: each task draws its own seeded sample (always with the largest and the
    smallest), so across tasks the zoo spans many architectures and the space can learn which
    architecture suits which data, not only which task's weights. ``False`` gives every task the
    same sample (the earlier zoo layout).
    """
    return sample_archs(family, m, task_arch_seed(seed, task) if per_task else seed)


def set_arch(model: torch.nn.Module, arch: Arch) -> None:
    """Make ``arch`` the active subnet of ``model`` (an OFA-MobileNetV3, possibly DDP-wrapped)."""
    net: Any = unwrap(model)  # an OFAMobileNetV3 (untyped)
    per_stage = len(net.block_group_info[0])  # the family's largest depth (<= SLOTS_PER_STAGE)
    bad = [v for v in arch.d if v not in net.depth_list]
    bad += [v for v in arch.ks if v and v not in net.ks_list] + [
        v for v in arch.e if v and v not in net.expand_ratio_list
    ]
    if bad:
        raise ValueError(f"arch uses choices this supernet lacks: {sorted(set(bad))} (ks {net.ks_list}, "
                         f"e {net.expand_ratio_list}, d {net.depth_list})")
    max_ks, max_e = max(net.ks_list), max(net.expand_ratio_list)
    ks: list[int] = []
    e: list[int] = []
    for stage in range(N_STAGES):
        for slot in range(per_stage):
            i = stage * SLOTS_PER_STAGE + slot
            # Absent slots (0) get a valid choice: the block is not run, but stays well-formed.
            ks.append(arch.ks[i] or max_ks)
            e.append(arch.e[i] or max_e)
    net.set_active_subnet(ks=ks, e=e, d=list(arch.d))


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)


def model_id(family_name: str, task: str, arch: Arch) -> str:
    """A stable, URL-safe id: ``<family>-<task>-<10 hex of sha256(family, task, arch)>``."""
    blob = json.dumps({"family": family_name, "task": task, **arch.to_dict()}, sort_keys=True)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:ID_HASH_CHARS]
    return f"{_safe(family_name)}-{_safe(task)}-{digest}"

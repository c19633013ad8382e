"""tans.zoo.ofa_loader_stub: OFA's networks load without torchvision; OFA's loader still works."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]

PROBE = """
import sys
from tans.zoo.subnets import largest
from tans.zoo.supernets import get_family
import torch
family = get_family("ofa_mbv3_tiny")
net = family.build(3).eval()
with torch.no_grad():
    assert net(torch.zeros(1, 3, 32, 32)).shape == (1, 3)
print("torchvision" in sys.modules)
# the stand-in loads the real module on first use, torchvision included
from ofa.utils.my_dataloader import my_random_resize_crop
crop = my_random_resize_crop.MyRandomResizedCrop(32)
from ofa.utils.my_dataloader.my_random_resize_crop import MyResize
print("torchvision" in sys.modules, type(crop).__name__, MyResize.__name__)
"""


@pytest.mark.timeout(120)
def test_networks_build_without_torchvision_and_the_loader_still_loads():
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=100)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "True", "MyRandomResizedCrop", "MyResize"]


def test_install_does_nothing_once_ofa_is_imported():
    code = ("import sys, ofa.utils; from tans.zoo import ofa_loader_stub as s; "
            "print(type(sys.modules[s.LOADER_MODULE]).__name__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=100)
    assert out.stdout.strip() == "module", out.stderr[-2000:]

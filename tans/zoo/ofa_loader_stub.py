"""OFA's networks without OFA's ImageNet data-loading helpers, and so without torchvision.

Importing anything from OFA runs ``ofa/utils/__init__.py``, which star-imports
``ofa.utils.my_dataloader``; its ``my_random_resize_crop`` imports torchvision, whose package
``__init__`` loads its models and ops and, through them, ``torch._dynamo``: about 2 CPU-seconds in
every process that builds a network (each zoo work item, Tune trial actor and Serve replica is a
fresh process), for the augmentation classes of OFA's own ImageNet trainer, which tans never uses.

:func:`install` (run by ``tans/zoo/__init__.py``, before any module of tans imports OFA) puts a
stand-in for that one module in ``sys.modules``: it star-exports nothing, and the first access to
any of its attributes imports the real module, torchvision included. Nothing else of OFA changes;
code that imports torchvision itself (``tans.space.features``' ResNet-18) gets the real package.
"""

from __future__ import annotations

import importlib
import sys
import types

LOADER_MODULE = "ofa.utils.my_dataloader.my_random_resize_crop"


class _DeferredLoader(types.ModuleType):
    """Stands in for :data:`LOADER_MODULE` until one of its attributes is asked for."""

    __all__: list[str] = []  # `from ... import *` in ofa.utils takes nothing from it

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        if sys.modules.get(LOADER_MODULE) is self:
            del sys.modules[LOADER_MODULE]
        real = importlib.import_module(LOADER_MODULE)
        parent = sys.modules.get(LOADER_MODULE.rpartition(".")[0])
        if parent is not None:
            setattr(parent, LOADER_MODULE.rpartition(".")[2], real)
        return getattr(real, name)


def install() -> None:
    """Register the stand-in, unless OFA's utilities are already imported (then it is too late)."""
    if "ofa.utils" in sys.modules or LOADER_MODULE in sys.modules:
        return
    sys.modules[LOADER_MODULE] = _DeferredLoader(LOADER_MODULE)

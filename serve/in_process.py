"""A deployment handle's calling convention over an object in this process (the fused app).

``handle.method.remote(*args)`` on a :class:`ray.serve.handle.DeploymentHandle` returns an
awaitable answer from another replica. :class:`InProcessHandle` gives the Ingress the same
``await handle.method.remote(*args)`` over an Encoder or Index object it holds itself, so one
Ingress code path serves both layouts (serve/app.py). Nothing is serialised: the arguments and the
answer are the caller's own objects.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import Any


class _InProcessMethod:
    def __init__(self, method: Callable[..., Any]):
        self._method = method

    def remote(self, *args: Any, **kwargs: Any) -> Awaitable[Any]:
        """The method's answer as an awaitable: coroutines run on this event loop, plain methods
        in a worker thread (as a replica runs them), so a slow one never blocks the loop."""
        if inspect.iscoroutinefunction(self._method):
            return self._method(*args, **kwargs)
        return asyncio.to_thread(self._method, *args, **kwargs)


class InProcessHandle:
    """``handle.<method>.remote(...)`` -> an awaitable of ``obj.<method>(...)``, in this process."""

    def __init__(self, obj: object):
        self._obj = obj

    def __getattr__(self, name: str) -> _InProcessMethod:
        if name.startswith("_"):
            raise AttributeError(name)
        method = getattr(self._obj, name)
        if not callable(method):
            raise AttributeError(f"{type(self._obj).__name__}.{name} is not a method")
        return _InProcessMethod(method)

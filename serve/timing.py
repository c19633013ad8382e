"""Where one request's time went, as an HTTP ``Server-Timing`` header (browsers' dev tools show it).

The Ingress times its own phases (``read``: the body arriving from the proxy; ``decode``:
parsed, image headers checked, images decoded; ``encode`` and ``search``: the calls to the
Encoder and the Index, the hop included) and adds what the two deployments report of their own
work (``encoder``, ``index``), so a slow request says whether the time went to decoding, to the
models, or between the deployments. ``ingress`` is the whole request inside the Ingress;
whatever a client measures above that is the proxy and the network. Durations are milliseconds,
as the header's syntax wants.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager

HEADER = "Server-Timing"


class ServerTiming:
    """Milliseconds per named phase of one request; a phase entered twice (a retry) adds up."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}
        self._start = time.perf_counter()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, (time.perf_counter() - t0) * 1e3)

    def add(self, name: str, ms: float | None) -> None:
        """Count ``ms`` under ``name`` (None, e.g. from a deployment of an older version: nothing)."""
        if ms is not None:
            self.ms[name] = self.ms.get(name, 0.0) + float(ms)

    def header(self) -> str:
        """``decode;dur=19.4, encode;dur=44.0, ..., ingress;dur=79.4`` (ingress: from creation to now)."""
        total = (time.perf_counter() - self._start) * 1e3
        return ", ".join(f"{name};dur={ms:.1f}" for name, ms in {**self.ms, "ingress": total}.items())


_DUR = re.compile(r"^\s*dur\s*=\s*([0-9.]+)\s*$")


def parse_server_timing(value: str) -> dict[str, float]:
    """{name: milliseconds} of a ``Server-Timing`` header; entries without a duration are skipped.

    Parameters may come in any order (``name;desc="...";dur=1.5``); a description holding a comma
    is not supported (this app writes none)."""
    out = {}
    for entry in value.split(","):
        name, *params = entry.split(";")
        for param in params:
            m = _DUR.match(param)
            if m and name.strip():
                out[name.strip()] = float(m.group(1))
    return out

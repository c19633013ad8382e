"""The fused layout's pieces that need no Serve: the in-process handle and the fused config."""

from __future__ import annotations

import asyncio
import threading

import pytest

from serve.args import AppArgs
from serve.deploy import app_config
from serve.in_process import InProcessHandle


class _Part:
    def __init__(self):
        self.value = 3

    async def twice(self, x: int) -> tuple[int, int]:
        return 2 * x, threading.get_ident()

    def plus(self, x: int, y: int = 0) -> tuple[int, int]:
        return x + y + self.value, threading.get_ident()


def test_in_process_handle_awaits_coroutines_here_and_runs_plain_methods_in_a_thread():
    handle = InProcessHandle(_Part())

    async def calls():
        loop_thread = threading.get_ident()
        doubled, doubled_in = await handle.twice.remote(4)
        added, added_in = await handle.plus.remote(1, y=2)
        return loop_thread, (doubled, doubled_in), (added, added_in)

    loop_thread, (doubled, doubled_in), (added, added_in) = asyncio.run(calls())
    assert (doubled, added) == (8, 6)
    assert doubled_in == loop_thread  # a coroutine runs on the caller's event loop
    assert added_in != loop_thread  # a plain method never blocks it
    with pytest.raises(AttributeError):
        handle._private  # noqa: B018 - only public methods are reachable
    with pytest.raises(AttributeError, match="not a method"):
        handle.value  # noqa: B018


def test_fused_config_is_the_ingress_alone_with_the_encoders_user_config_and_cpus():
    split = app_config(space="runA")
    (app,) = app_config(space="runA", fused=True, deployments={"Ingress": {"num_replicas": 1}})["applications"]
    encoder = next(d for d in split["applications"][0]["deployments"] if d["name"] == "Encoder")
    assert app["args"]["fused"] is True and AppArgs(**app["args"]).fused
    (ingress,) = app["deployments"]
    assert ingress["name"] == "Ingress" and ingress["num_replicas"] == 1
    assert ingress["user_config"] == {**encoder["user_config"], "space": "runA"}
    assert ingress["ray_actor_options"]["num_cpus"] == encoder["ray_actor_options"]["num_cpus"]
    assert AppArgs().fused is False  # the split layout stays the default


def test_fused_app_refuses_options_for_deployments_it_does_not_have():
    from serve.app import build_app

    with pytest.raises(ValueError, match="no Encoder or Index"):
        build_app(AppArgs(fused=True), deployment_options={"Encoder": {"num_replicas": 1}})

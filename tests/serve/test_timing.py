"""serve/timing.py: the Server-Timing header the Ingress writes, and its parser (no Ray)."""

from __future__ import annotations

import time

from serve.timing import ServerTiming, parse_server_timing


def test_phases_add_up_and_round_trip_through_the_header():
    timing = ServerTiming()
    with timing.phase("decode"):
        time.sleep(0.01)
    timing.add("encode", 2.5)
    timing.add("encode", 1.5)  # a retry during a space switch: the two calls add up
    timing.add("encoder", None)  # a deployment that reports nothing: no entry
    header = timing.header()

    parsed = parse_server_timing(header)
    assert list(parsed) == ["decode", "encode", "ingress"]
    assert parsed["encode"] == 4.0 and parsed["decode"] >= 10.0
    assert parsed["ingress"] >= parsed["decode"]  # the whole request, from the timing's creation


def test_parser_reads_other_servers_headers_and_skips_entries_without_a_duration():
    value = 'cache;desc="Cache Read";dur=23.2, db;dur=53, app;dur=47.2, miss'
    assert parse_server_timing(value) == {"cache": 23.2, "db": 53.0, "app": 47.2}

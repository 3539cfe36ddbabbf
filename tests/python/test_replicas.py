"""Replicas: two gateways on one Postgres and one Redis behave as one gateway.

Needs PORTCULLIS_TEST_DATABASE_URL (a Postgres database) and PORTCULLIS_TEST_REDIS_URL; `.ci/services`
starts both, and in CI (PORTCULLIS_REQUIRE_SERVICES=1) these tests fail rather than skip without
them. The Redis outage tests start a Redis of their own (`redis-server` must be installed), so
they can stop it without disturbing the others.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import httpx
import openai
import pytest

from conftest import MASTER_KEY, Gateway, finish_gateway, start_gateway
from test_governance import (
    MODEL,
    SLOW_MODEL,
    Admin,
    call,
    cost_of,
    eventually,
    governance_config,
    refused,
    sha256,
    unique,
)

DATABASE_URL = os.environ.get("PORTCULLIS_TEST_DATABASE_URL")
REDIS_URL = os.environ.get("PORTCULLIS_TEST_REDIS_URL")
CHANNEL = "portcullis_changes"
# The promise: a change on one replica reaches the others within a second; 2 s leaves
# room for a busy machine.
CHANGE_DEADLINE_S = 2.0

if os.environ.get("PORTCULLIS_REQUIRE_SERVICES") == "1":
    assert DATABASE_URL and REDIS_URL, "PORTCULLIS_TEST_DATABASE_URL and PORTCULLIS_TEST_REDIS_URL must be set"
pytestmark = pytest.mark.skipif(
    not (DATABASE_URL and REDIS_URL),
    reason="set PORTCULLIS_TEST_DATABASE_URL=postgres://... and PORTCULLIS_TEST_REDIS_URL=redis://... "
    '(eval "$(.ci/services)" starts both)',
)


def replica_config(upstream_base: str, **store: Any) -> dict:
    config = governance_config(upstream_base, **store)
    config["store"]["database_url"] = DATABASE_URL
    return config


@pytest.fixture(scope="module")
def pair(fake_upstream, tmp_path_factory) -> Iterator[tuple[Gateway, Gateway]]:
    """Two replicas sharing the test database and the test Redis."""
    config = replica_config(fake_upstream.base_url, redis_url=REDIS_URL)
    a = start_gateway(config, tmp_path_factory.mktemp("replica-a"))
    b = start_gateway(config, tmp_path_factory.mktemp("replica-b"))
    yield a, b
    finish_gateway(a)
    finish_gateway(b)


@pytest.fixture(scope="module")
def admin_a(pair) -> Iterator[Admin]:
    with Admin(pair[0]) as admin:
        yield admin


def works(gw: Gateway, key: str) -> bool:
    try:
        call(gw, key)
        return True
    except openai.AuthenticationError:
        return False


def seconds_until_refused(gw: Gateway, key: str) -> float:
    started = time.monotonic()
    while works(gw, key):
        assert time.monotonic() - started < 10, "the change never reached the replica"
        time.sleep(0.05)
    return time.monotonic() - started


# --------------------------------------------------------------------------- one gateway, two processes


def test_a_key_made_on_one_replica_works_on_the_other(pair, admin_a):
    a, b = pair
    key = admin_a.new_key(models=[MODEL])["key"]
    assert call(b, key).parse().choices[0].message.content
    assert call(a, key).parse().choices[0].message.content


def test_an_rpm_limit_holds_across_both_replicas(pair, admin_a):
    a, b = pair
    key = admin_a.new_key(rpm_limit=4)["key"]
    remaining = [int(call(gw, key).headers["x-ratelimit-remaining-requests"]) for gw in (a, b, a, b)]
    assert remaining == [3, 2, 1, 0]
    for gw in (a, b):
        e = refused(gw, key, openai.RateLimitError)
        assert float(e.response.headers["retry-after"]) > 0


def test_a_parallel_limit_holds_across_both_replicas(pair, admin_a, fake_upstream):
    a, b = pair
    key = admin_a.new_key(max_parallel_requests=1)["key"]
    fake_upstream.echo(delay_s=1.0)
    try:
        with ThreadPoolExecutor(1) as pool:
            held = pool.submit(call, a, key, model=SLOW_MODEL)
            time.sleep(0.4)
            refused(b, key, openai.RateLimitError, model=SLOW_MODEL)
            held.result()
    finally:
        fake_upstream.reset()
    # The slot is back by the time the call's answer has arrived, on either replica.
    assert call(b, key, model=SLOW_MODEL)


def test_a_key_deleted_on_one_replica_is_refused_by_the_other_within_2s(pair, admin_a):
    a, b = pair
    key = admin_a.new_key()["key"]
    assert works(b, key)  # now cached on b
    admin_a.ok("POST", "/key/delete", {"keys": [key]})
    assert seconds_until_refused(b, key) < CHANGE_DEADLINE_S


def test_a_key_blocked_on_one_replica_is_refused_by_the_other(pair, admin_a):
    a, b = pair
    key = admin_a.new_key()["key"]
    assert works(b, key)
    admin_a.ok("POST", "/key/block", {"key": key})
    assert seconds_until_refused(b, key) < CHANGE_DEADLINE_S
    admin_a.ok("POST", "/key/unblock", {"key": key})
    eventually(lambda: works(b, key), bool, timeout=CHANGE_DEADLINE_S)
    assert works(b, key)


def test_a_budget_spent_on_one_replica_refuses_the_next_call_on_the_other(pair, admin_a):
    a, b = pair
    one_call = cost_of(call(a, admin_a.new_key()["key"]))
    key = admin_a.new_key(max_budget=1.5 * one_call)["key"]
    # b knows the key (and its spend) before a spends: only a shared counter can tell it more.
    call(b, key)
    call(a, key)
    e = refused(b, key, openai.RateLimitError)
    assert e.code == "insufficient_quota"


def test_spend_from_both_replicas_adds_up(pair, admin_a):
    a, b = pair
    key = admin_a.new_key()["key"]

    def spend_a_little(gw: Gateway) -> float:
        return sum(cost_of(call(gw, key, text=f"call {i}")) for i in range(10))

    with ThreadPoolExecutor(2) as pool:
        total = sum(pool.map(spend_a_little, [a, b]))
    assert total > 0
    # Totals reach the database within about a second; either replica then reports the sum.
    for gw in pair:
        with Admin(gw) as admin:
            spend = eventually(lambda: admin.key_info(key)["spend"], lambda s: abs(s - total) < 1e-12)
            assert spend == pytest.approx(total, rel=1e-9)
    # And every call is one row, whichever replica served it.
    rows = admin_a.wait_spend_logs(20, api_key=key)
    assert sum(r["spend"] for r in rows) == pytest.approx(total, rel=1e-9)


# --------------------------------------------------------------------------- each channel alone


def psql(sql: str) -> None:
    assert shutil.which("psql"), "psql is needed to change the database behind the gateways"
    subprocess.run(["psql", "-q", "-v", "ON_ERROR_STOP=1", DATABASE_URL, "-c", sql], check=True, capture_output=True)


def redis_command(url: str, *args: str) -> None:
    """One command over RESP, so the test needs no Redis client library."""
    host_port = url.removeprefix("redis://").split("/")[0]
    host, _, port = host_port.rpartition(":")
    with socket.create_connection((host or "127.0.0.1", int(port or 6379)), timeout=5) as s:
        s.sendall(f"*{len(args)}\r\n".encode() + b"".join(f"${len(a.encode())}\r\n{a}\r\n".encode() for a in args))
        reply = s.recv(1024)
        assert not reply.startswith(b"-"), reply


def block_behind_the_gateways(key: str) -> None:
    """Blocks a key in the database without telling anyone: only an announcement makes it count."""
    psql(f"UPDATE portcullis_keys SET blocked = 1 WHERE token = '{sha256(key)}'")


@pytest.mark.parametrize("channel", ["postgres", "redis"])
def test_each_channel_alone_carries_a_change_to_a_replica(pair, admin_a, channel):
    a, b = pair
    key = admin_a.new_key()["key"]
    assert works(b, key)
    block_behind_the_gateways(key)
    assert works(b, key), "served from the cache until a change is announced"
    message = f"test-origin key {sha256(key)}"
    if channel == "postgres":
        psql(f"SELECT pg_notify('{CHANNEL}', '{message}')")
    else:
        redis_command(REDIS_URL, "PUBLISH", CHANNEL, message)
    assert seconds_until_refused(b, key) < CHANGE_DEADLINE_S


# --------------------------------------------------------------------------- Redis goes away


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OwnRedis:
    """A throw-away Redis that a test may stop and start again on the same port."""

    def __init__(self) -> None:
        assert shutil.which("redis-server"), "redis-server must be installed"
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                redis_command(self.url, "PING")
                return
            except OSError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def pause(self) -> None:
        """Unresponsive but alive, its data intact: calls to it time out."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)


@pytest.fixture
def own_redis() -> Iterator[OwnRedis]:
    redis = OwnRedis()
    yield redis
    redis.stop()


def redis_status(gw: Gateway) -> dict:
    r = httpx.get(f"{gw.url}/admin/status", headers={"Authorization": f"Bearer {MASTER_KEY}"}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["store"]["redis"]


def test_without_redis_a_replica_counts_on_its_own_and_says_so(fake_upstream, tmp_path, own_redis):
    gw = start_gateway(replica_config(fake_upstream.base_url, redis_url=own_redis.url), tmp_path / "gw")
    try:
        with Admin(gw) as admin:
            assert redis_status(gw)["state"] == "connected"
            key = admin.new_key(rpm_limit=3)["key"]
            call(gw, key)
            own_redis.stop()
            # The first call after the loss finds out; it and the rest are counted here, under the
            # same limit (a fresh minute's allowance, since this replica's bucket was never used).
            statuses = []
            for _ in range(4):
                try:
                    call(gw, key)
                    statuses.append(200)
                except openai.RateLimitError:
                    statuses.append(429)
            assert statuses == [200, 200, 200, 429]
            status = redis_status(gw)
            assert (status["state"], status["counters"]) == ("unreachable", "local")
            assert status["last_error"]
            assert "redis unreachable" in gw.stderr()
            # Back again: the replica finds it within a few seconds and shares counters again.
            own_redis.start()
            status = eventually(lambda: redis_status(gw), lambda s: s["state"] == "connected", timeout=10)
            assert status["counters"] == "shared"
            assert gw.stderr().count("redis reachable") == 2  # at start, and now
            assert call(gw, key)
    finally:
        finish_gateway(gw)


def test_what_calls_give_back_while_redis_hangs_reaches_it_when_it_answers_again(
    fake_upstream, tmp_path, own_redis
):
    gw = start_gateway(replica_config(fake_upstream.base_url, redis_url=own_redis.url), tmp_path / "gw")
    fake_upstream.echo(delay_s=1.0)
    try:
        with Admin(gw) as admin, ThreadPoolExecutor(1) as pool:
            key = admin.new_key(max_parallel_requests=1)["key"]
            held = pool.submit(call, gw, key, model=SLOW_MODEL)
            time.sleep(0.4)
            own_redis.pause()
            held.result()  # ends while Redis hangs: its slot cannot be given back yet
            assert eventually(lambda: redis_status(gw), lambda s: s["state"] == "unreachable", timeout=3)
            own_redis.resume()
            eventually(lambda: redis_status(gw), lambda s: s["state"] == "connected", timeout=10)
            fake_upstream.echo()
            # The slot went back with Redis: the key's one parallel call is free, not held for minutes.
            assert call(gw, key, model=SLOW_MODEL)
    finally:
        own_redis.resume()
        fake_upstream.reset()
        finish_gateway(gw)


def test_fail_closed_refuses_limited_calls_with_503_while_redis_is_down(fake_upstream, tmp_path, own_redis):
    config = replica_config(fake_upstream.base_url, redis_url=own_redis.url, fail_closed=True)
    gw = start_gateway(config, tmp_path / "gw")
    try:
        with Admin(gw) as admin:
            limited = admin.new_key(rpm_limit=100)["key"]
            unlimited = admin.new_key()["key"]
            call(gw, limited)
            own_redis.stop()
            for _ in range(2):  # the call that finds Redis gone, and one after
                e = refused(gw, limited, openai.APIStatusError)
                assert e.status_code == 503
                assert "fail_closed" in e.message
            # Nothing to count for a key without budget or limits: it still works.
            assert call(gw, unlimited)
            assert redis_status(gw)["counters"] == "refusing"
            own_redis.start()
            eventually(lambda: redis_status(gw), lambda s: s["state"] == "connected", timeout=10)
            assert call(gw, limited)
    finally:
        finish_gateway(gw)


def test_a_replica_starts_while_redis_is_down(fake_upstream, tmp_path, own_redis):
    own_redis.stop()
    gw = start_gateway(replica_config(fake_upstream.base_url, redis_url=own_redis.url), tmp_path / "gw")
    try:
        assert redis_status(gw)["state"] == "unreachable"
        assert "redis unreachable at start" in gw.stderr()
        with Admin(gw) as admin:
            assert call(gw, admin.new_key(rpm_limit=10)["key"])
    finally:
        finish_gateway(gw)

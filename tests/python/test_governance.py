"""Governance: stored virtual keys, teams, users, budgets, rate limits and spend logs.

The management API is LiteLLM's shape, so the checks are written against that contract; calls go
through the official `openai` SDK to show which exception each refusal becomes for a user.

With PORTCULLIS_TEST_DATABASE_URL set, every gateway here stores into that database instead of
its own SQLite file. That database may hold rows from earlier runs, so every test makes its own
uniquely named keys, teams and users and only looks at those.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

import httpx
import openai
import pytest

from conftest import (
    INPUT_COST,
    MASTER_KEY,
    OUTPUT_COST,
    UPSTREAM_KEY,
    UPSTREAM_MODEL,
    Gateway,
    finish_gateway,
    start_gateway,
)

MODEL = "gov-mock"
OTHER_MODEL = "gov-other"
SLOW_MODEL = "gov-slow"  # through the fake upstream, so a test can hold a call open
DATABASE_URL_ENV = "PORTCULLIS_TEST_DATABASE_URL"
DATABASE_URL = os.environ.get(DATABASE_URL_ENV)
# Far below one call's cost: the first call fits, and pushes the spend over.
TINY_BUDGET = 1e-9
# Spend rows are written in batches about once a second.
SPEND_LOG_WAIT_S = 3.5
KEY_FIELDS = {
    "key", "token", "key_name", "key_alias", "team_id", "user_id", "models", "max_budget",
    "budget_duration", "budget_reset_at", "rpm_limit", "tpm_limit", "max_parallel_requests",
    "expires", "metadata", "guardrails", "blocked", "spend", "created_at",
}
TEAM_FIELDS = {
    "team_id", "team_alias", "models", "max_budget", "budget_duration", "budget_reset_at",
    "rpm_limit", "tpm_limit", "max_parallel_requests", "metadata", "blocked", "spend", "created_at",
}
SPEND_LOG_FIELDS = {
    "request_id", "api_key", "spend", "prompt_tokens", "completion_tokens", "total_tokens",
    "model", "model_group", "model_id", "user", "team_id", "end_user", "startTime", "endTime",
    "status",
}
# "850ms", "12s", "1m0s", "1h2m3s": Go-style durations, as OpenAI's own reset headers.
DURATION = re.compile(r"^(\d+h)?(\d+m)?\d+(\.\d+)?(ms|s)$")
needs_sqlite = pytest.mark.skipif(
    bool(DATABASE_URL), reason=f"checks the SQLite file; {DATABASE_URL_ENV} points elsewhere"
)


def governance_config(upstream_base: str, **store: Any) -> dict:
    if DATABASE_URL:
        store["database_url"] = DATABASE_URL
    priced = {"input_cost_per_token": INPUT_COST, "output_cost_per_token": OUTPUT_COST}
    return {
        "server": {"listen": "127.0.0.1:0", "shutdown_drain_s": 2},
        "auth": {"master_key": MASTER_KEY, "keys": []},
        "store": store,
        "models": [
            {"name": MODEL, "provider": "mock", "model": "mock-echo", **priced},
            {"name": OTHER_MODEL, "provider": "mock", "model": "mock-echo", **priced},
            {
                "name": SLOW_MODEL,
                "provider": "openai_compatible",
                "model": UPSTREAM_MODEL,
                "api_base": upstream_base,
                "api_key": UPSTREAM_KEY,
                "timeout_s": 5,
                **priced,
            },
        ],
        # Failures must reach the test as they are: no retries, no cooldown.
        "router": {"num_retries": 0, "timeout_s": 5, "allowed_fails": 100, "cooldown_s": 1},
    }


# --------------------------------------------------------------------------- helpers


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def parse_time(value: str) -> datetime:
    parsed = datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def tokens_of(items: list) -> set[str]:
    """Token hashes of a list of key info objects (or of hashes already)."""
    return {item["token"] if isinstance(item, dict) else item for item in items}


def eventually(fetch: Callable[[], Any], done: Callable[[Any], bool], timeout: float = SPEND_LOG_WAIT_S) -> Any:
    """Polls `fetch` until `done` holds or `timeout` passes; returns the last value either way."""
    deadline = time.monotonic() + timeout
    while True:
        value = fetch()
        if done(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def assert_error(r: httpx.Response, status: int, param: Any = ...) -> dict:
    assert r.status_code == status, f"{r.request.method} {r.request.url}: {r.status_code} {r.text}"
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if param is not ...:
        assert err["param"] == param, err
    return err


class Admin:
    """The management API, as the master key (or another key) calls it."""

    def __init__(self, gw: Gateway, key: str | None = MASTER_KEY) -> None:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=gw.url, headers=headers, timeout=10)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "Admin":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def request(self, method: str, path: str, body: Any = None, **params: Any) -> httpx.Response:
        return self.http.request(method, path, json=body, params=params or None)

    def ok(self, method: str, path: str, body: Any = None, **params: Any) -> Any:
        r = self.request(method, path, body, **params)
        assert r.status_code == 200, f"{method} {path} {body or params}: {r.status_code} {r.text}"
        return r.json()

    def new_key(self, **fields: Any) -> dict:
        fields.setdefault("key_alias", unique("key"))
        return self.ok("POST", "/key/generate", fields)

    def key_info(self, key: str) -> dict:
        return self.ok("GET", "/key/info", key=key)["info"]

    def update_key(self, key: str, **fields: Any) -> dict:
        return self.ok("POST", "/key/update", {"key": key, **fields})

    def new_team(self, **fields: Any) -> dict:
        fields.setdefault("team_id", unique("team"))
        return self.ok("POST", "/team/new", fields)

    def new_user(self, **fields: Any) -> dict:
        fields.setdefault("user_id", unique("user"))
        return self.ok("POST", "/user/new", fields)

    def spend_logs(self, **filters: Any) -> list[dict]:
        return self.ok("GET", "/spend/logs", **filters)

    def wait_spend_logs(self, count: int, **filters: Any) -> list[dict]:
        """The rows for `filters` once at least `count` are written (they come in batches)."""
        return eventually(lambda: self.spend_logs(**filters), lambda rows: len(rows) >= count)


def sdk(gw: Gateway, key: str, **options: Any) -> openai.OpenAI:
    options.setdefault("max_retries", 0)
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, timeout=10, **options)


def call(gw: Gateway, key: str, text: str = "hi", model: str = MODEL, **params: Any):
    """One chat call with `key`; returns the raw response (headers and `.parse()`), or raises."""
    with sdk(gw, key) as client:
        return client.chat.completions.with_raw_response.create(model=model, messages=user(text), **params)


def refused(gw: Gateway, key: str, error: type[openai.APIStatusError], **params: Any) -> openai.APIStatusError:
    with pytest.raises(error) as e:
        call(gw, key, **params)
    return e.value


def cost_of(raw) -> float:
    return float(raw.headers["x-portcullis-response-cost"])


class OwnGateway:
    """A gateway of a test's own, restartable on the same config and directory."""

    def __init__(self, config: dict, workdir: Path) -> None:
        self.workdir = workdir
        self.gw = start_gateway(config, workdir)
        self.running = True

    def stop(self) -> None:
        self.gw.stop()
        self.running = False

    def start(self) -> Gateway:
        assert not self.running
        self.gw = start_gateway(self.gw.config, self.workdir)
        self.running = True
        return self.gw

    def finish(self) -> None:
        if self.running:
            finish_gateway(self.gw)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def gov(fake_upstream, tmp_path_factory) -> Gateway:
    gw = start_gateway(governance_config(fake_upstream.base_url), tmp_path_factory.mktemp("governance"))
    yield gw
    finish_gateway(gw)


@pytest.fixture(scope="module")
def gov_422(fake_upstream, tmp_path_factory) -> Gateway:
    config = governance_config(fake_upstream.base_url, budget_exceeded_status=422)
    gw = start_gateway(config, tmp_path_factory.mktemp("governance-422"))
    yield gw
    finish_gateway(gw)


@pytest.fixture
def own_gateway(fake_upstream, tmp_path) -> OwnGateway:
    own = OwnGateway(governance_config(fake_upstream.base_url), tmp_path / "gateway")
    yield own
    own.finish()


@pytest.fixture(scope="module")
def admin(gov) -> Admin:
    with Admin(gov) as a:
        yield a


# --------------------------------------------------------------------------- keys: management


def test_generate_returns_a_new_key_and_its_record(admin):
    alias = unique("plain")
    k = admin.new_key(key_alias=alias)
    assert KEY_FIELDS <= set(k)
    key = k["key"]
    assert re.fullmatch(r"sk-[A-Za-z0-9_-]{22,}", key), key
    assert k["token"] == sha256(key)
    assert k["key_name"].startswith("sk-...") and k["key_name"].endswith(key[-4:])
    assert key not in k["key_name"]
    assert k["key_alias"] == alias
    assert k["spend"] == 0
    assert k["blocked"] is False
    assert k["expires"] is None and k["budget_reset_at"] is None
    assert abs(parse_time(k["created_at"]) - datetime.now(timezone.utc)) < timedelta(minutes=1)
    assert admin.new_key()["key"] != key


def test_generate_echoes_every_field(admin):
    team = admin.new_team()
    owner = admin.new_user()
    fields = {
        "models": [MODEL],
        "max_budget": 12.5,
        "budget_duration": "7d",
        "rpm_limit": 100,
        "tpm_limit": 10000,
        "max_parallel_requests": 4,
        "duration": "24h",
        "key_alias": unique("full"),
        "team_id": team["team_id"],
        "user_id": owner["user_id"],
        "metadata": {"owner": "qa", "n": 1},
        "guardrails": [],
        "blocked": False,
    }
    k = admin.new_key(**fields)
    for name, value in fields.items():
        if name != "duration":
            assert k[name] == value, name
    created = parse_time(k["created_at"])
    # Both periods are anchored at the key's creation.
    assert abs(parse_time(k["expires"]) - (created + timedelta(hours=24))) < timedelta(minutes=1)
    assert abs(parse_time(k["budget_reset_at"]) - (created + timedelta(days=7))) < timedelta(minutes=1)


@pytest.mark.parametrize("duration", ["30s", "30m", "24h", "7d", "1w", "1mo"])
def test_generate_accepts_each_duration_unit(admin, duration):
    k = admin.new_key(budget_duration=duration, duration=duration)
    assert k["budget_duration"] == duration
    assert parse_time(k["expires"]) > parse_time(k["created_at"])


def test_update_is_a_merge_patch(admin):
    k = admin.new_key(max_budget=5, rpm_limit=10, models=[MODEL], metadata={"a": 1})
    info = admin.update_key(k["key"], max_budget=7, rpm_limit=None)
    assert info["max_budget"] == 7
    assert info["rpm_limit"] is None  # null clears
    assert info["models"] == [MODEL]  # absent leaves as is
    assert info["metadata"] == {"a": 1}
    assert info["key_alias"] == k["key_alias"]
    assert admin.key_info(k["key"])["max_budget"] == 7


def test_key_info_has_the_generate_fields_and_spend(admin):
    k = admin.new_key(max_budget=3)
    body = admin.ok("GET", "/key/info", key=k["key"])
    assert body["key"] == k["key"]
    info = body["info"]
    assert KEY_FIELDS - {"key"} <= set(info)
    for name in KEY_FIELDS - {"key"}:
        assert info[name] == k[name], name


def test_a_key_reads_its_own_info(gov, admin):
    k = admin.new_key()
    with Admin(gov, key=k["key"]) as own:
        assert own.ok("GET", "/key/info")["info"]["token"] == k["token"]
        assert own.ok("GET", "/key/info", key=k["key"])["info"]["token"] == k["token"]


def test_a_key_cannot_read_another_keys_info(gov, admin):
    mine, theirs = admin.new_key(), admin.new_key()
    with Admin(gov, key=mine["key"]) as own:
        assert_error(own.request("GET", "/key/info", key=theirs["key"]), 403)


def test_routes_accept_the_token_hash_for_the_key(admin):
    k = admin.new_key()
    token = k["token"]
    assert admin.key_info(token)["key_alias"] == k["key_alias"]
    assert admin.update_key(token, max_budget=3)["max_budget"] == 3
    assert admin.ok("POST", "/key/block", {"key": token})["blocked"] is True
    assert admin.ok("POST", "/key/unblock", {"key": token})["blocked"] is False
    fresh = admin.ok("POST", "/key/regenerate", {"key": token})
    deleted = admin.ok("POST", "/key/delete", {"keys": [fresh["token"]]})["deleted_keys"]
    assert len(deleted) == 1 and deleted[0] in (fresh["key"], fresh["token"])
    assert_error(admin.request("GET", "/key/info", key=fresh["token"]), 404)


def test_delete_removes_the_key(gov, admin):
    k = admin.new_key()
    call(gov, k["key"])
    deleted = admin.ok("POST", "/key/delete", {"keys": [k["key"]]})["deleted_keys"]
    assert len(deleted) == 1 and deleted[0] in (k["key"], k["token"])
    assert_error(admin.request("GET", "/key/info", key=k["key"]), 404)
    err = refused(gov, k["key"], openai.AuthenticationError)
    assert "deleted" in err.message.lower()


def test_list_pages_and_filters_by_team(admin):
    team = admin.new_team()
    made = [admin.new_key(team_id=team["team_id"]) for _ in range(3)]
    first = admin.ok("GET", "/key/list", team_id=team["team_id"], page=1, size=2)
    assert first["total_count"] == 3
    assert first["total_pages"] == 2
    assert first["current_page"] == 1
    assert len(first["keys"]) == 2
    assert all(isinstance(k, str) for k in first["keys"])  # token hashes unless asked for objects
    second = admin.ok("GET", "/key/list", team_id=team["team_id"], page=2, size=2)
    assert second["current_page"] == 2 and len(second["keys"]) == 1
    assert set(first["keys"]) | set(second["keys"]) == {k["token"] for k in made}


def test_list_filters_by_alias_and_user(admin):
    k = admin.new_key()
    by_alias = admin.ok("GET", "/key/list", key_alias=k["key_alias"])
    assert by_alias["keys"] == [k["token"]] and by_alias["total_count"] == 1
    owner = admin.new_user()
    by_user = admin.ok("GET", "/key/list", user_id=owner["user_id"])
    assert by_user["keys"] == [sha256(owner["key"])]


def test_list_can_return_full_objects(admin):
    k = admin.new_key(max_budget=2)
    listed = admin.ok("GET", "/key/list", key_alias=k["key_alias"], return_full_object="true")
    [obj] = listed["keys"]
    assert obj["token"] == k["token"]
    assert obj["max_budget"] == 2
    assert obj["key_alias"] == k["key_alias"]


def test_block_and_unblock(gov, admin):
    k = admin.new_key()
    assert admin.ok("POST", "/key/block", {"key": k["key"]})["blocked"] is True
    err = refused(gov, k["key"], openai.AuthenticationError)
    assert "blocked" in err.message.lower()
    assert admin.ok("POST", "/key/unblock", {"key": k["key"]})["blocked"] is False
    assert call(gov, k["key"]).status_code == 200


def test_a_key_generated_blocked_is_refused(gov, admin):
    k = admin.new_key(blocked=True)
    assert k["blocked"] is True
    assert "blocked" in refused(gov, k["key"], openai.AuthenticationError).message.lower()


def test_regenerate_replaces_the_secret_and_keeps_limits_and_spend(gov, admin):
    k = admin.new_key(max_budget=10, rpm_limit=100, models=[MODEL])
    call(gov, k["key"], "spend something")
    spent = eventually(lambda: admin.key_info(k["key"])["spend"], lambda s: s > 0, timeout=3)
    assert spent > 0
    fresh = admin.ok("POST", "/key/regenerate", {"key": k["key"]})
    assert fresh["key"] != k["key"]
    assert re.fullmatch(r"sk-[A-Za-z0-9_-]{22,}", fresh["key"])
    assert fresh["token"] == sha256(fresh["key"])
    for name in ("max_budget", "rpm_limit", "models", "key_alias"):
        assert fresh[name] == k[name], name
    assert math.isclose(admin.key_info(fresh["key"])["spend"], spent, rel_tol=1e-9)
    refused(gov, k["key"], openai.AuthenticationError)
    assert call(gov, fresh["key"]).status_code == 200


# --------------------------------------------------------------------------- teams and users


def test_team_new_generates_an_id(admin):
    team = admin.ok("POST", "/team/new", {"team_alias": "no id given"})
    assert TEAM_FIELDS <= set(team)
    assert team["team_id"]
    assert team["team_alias"] == "no id given"
    assert team["spend"] == 0 and team["blocked"] is False


def test_team_new_echoes_its_fields(admin):
    fields = {
        "team_id": unique("team"),
        "team_alias": "platform",
        "models": [MODEL],
        "max_budget": 50,
        "budget_duration": "1mo",
        "rpm_limit": 600,
        "tpm_limit": 100000,
        "max_parallel_requests": 8,
        "metadata": {"cost_center": 42},
        "blocked": False,
    }
    team = admin.new_team(**fields)
    for name, value in fields.items():
        assert team[name] == value, name
    assert parse_time(team["budget_reset_at"]) > parse_time(team["created_at"])


def test_team_update_is_a_merge_patch(admin):
    team = admin.new_team(team_alias="before", max_budget=5, rpm_limit=10)
    updated = admin.ok("POST", "/team/update", {"team_id": team["team_id"], "team_alias": "after", "rpm_limit": None})
    assert updated["team_alias"] == "after"
    assert updated["rpm_limit"] is None
    assert updated["max_budget"] == 5


def test_team_info_lists_its_keys(admin):
    team = admin.new_team()
    made = [admin.new_key(team_id=team["team_id"]) for _ in range(2)]
    admin.new_key()  # not in the team
    info = admin.ok("GET", "/team/info", team_id=team["team_id"])
    assert info["team_id"] == team["team_id"]
    assert info["team_info"]["team_id"] == team["team_id"]
    assert tokens_of(info["keys"]) == {k["token"] for k in made}


def test_team_list_includes_a_new_team(admin):
    team = admin.new_team()
    teams = admin.ok("GET", "/team/list")
    assert isinstance(teams, list)
    [listed] = [t for t in teams if t["team_id"] == team["team_id"]]
    assert TEAM_FIELDS <= set(listed)


def test_team_delete_deletes_its_keys(gov, admin):
    team = admin.new_team()
    k = admin.new_key(team_id=team["team_id"])
    call(gov, k["key"])
    body = admin.ok("POST", "/team/delete", {"team_ids": [team["team_id"]]})
    assert body["deleted_teams"] == [team["team_id"]]
    assert_error(admin.request("GET", "/team/info", team_id=team["team_id"]), 404)
    assert_error(admin.request("GET", "/key/info", key=k["key"]), 404)
    refused(gov, k["key"], openai.AuthenticationError)


def test_user_new_returns_the_user_and_a_key_of_theirs(gov, admin):
    uid = unique("user")
    u = admin.new_user(user_id=uid, user_alias="Ada", user_email="ada@example.com", max_budget=9)
    assert u["user_id"] == uid
    assert u["user_alias"] == "Ada"
    assert u["user_email"] == "ada@example.com"
    assert u["max_budget"] == 9
    assert re.fullmatch(r"sk-[A-Za-z0-9_-]{22,}", u["key"])
    assert admin.key_info(u["key"])["user_id"] == uid
    assert call(gov, u["key"]).status_code == 200


def test_user_new_generates_an_id(admin):
    u = admin.ok("POST", "/user/new", {"user_alias": "anonymous"})
    assert u["user_id"]
    assert admin.key_info(u["key"])["user_id"] == u["user_id"]


def test_user_info_has_spend_and_keys(admin):
    u = admin.new_user()
    other = admin.new_key(user_id=u["user_id"])
    info = admin.ok("GET", "/user/info", user_id=u["user_id"])
    assert info["user_id"] == u["user_id"]
    assert info["user_info"]["spend"] == 0
    assert tokens_of(info["keys"]) == {sha256(u["key"]), other["token"]}


# --------------------------------------------------------------------------- management errors


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"bogus": 1}, "bogus"),
        ({"max_budget": -1}, "max_budget"),
        ({"budget_duration": "banana"}, "budget_duration"),
        ({"duration": "banana"}, "duration"),
        ({"rpm_limit": "ten"}, "rpm_limit"),
        ({"tpm_limit": -5}, "tpm_limit"),
        ({"max_parallel_requests": 1.5}, "max_parallel_requests"),
        ({"models": "gov-mock"}, "models"),
        ({"metadata": "not an object"}, "metadata"),
        ({"blocked": "yes"}, "blocked"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_generate_rejects_bad_fields_naming_them(admin, body, param):
    err = assert_error(admin.request("POST", "/key/generate", body), 400, param)
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/team/new", {"budget_duration": "banana"}, "budget_duration"),
        ("/team/new", {"max_budget": -1}, "max_budget"),
        ("/user/new", {"bogus": True}, "bogus"),
        ("/key/update", {"max_budget": -1}, "max_budget"),
        ("/key/update", {"nope": 1}, "nope"),
    ],
)
def test_other_routes_reject_bad_fields_naming_them(admin, path, body, param):
    if path == "/key/update":
        body = {"key": admin.new_key()["key"], **body}
    assert_error(admin.request("POST", path, body), 400, param)


@pytest.mark.parametrize("path", ["/key/generate", "/team/new", "/user/new"])
def test_a_body_that_is_not_json_is_400(gov, path):
    r = httpx.post(
        f"{gov.url}{path}",
        headers={"Authorization": f"Bearer {MASTER_KEY}", "Content-Type": "application/json"},
        content=b'{"max_budget": ',
    )
    assert_error(r, 400)


MANAGEMENT_ROUTES = [
    ("POST", "/key/generate", {}),
    ("POST", "/key/update", {"max_budget": 1}),
    ("POST", "/key/delete", None),
    ("POST", "/key/block", None),
    ("POST", "/key/regenerate", None),
    ("GET", "/key/list", None),
    ("POST", "/team/new", {}),
    ("GET", "/team/list", None),
    ("POST", "/user/new", {}),
    ("GET", "/spend/logs", None),
]


def _route_body(path: str, body: dict | None, key: str) -> dict | None:
    # The key's own record is the target, so only the caller's rights are in question.
    if path == "/key/delete":
        return {"keys": [key]}
    if path in ("/key/block", "/key/regenerate"):
        return {"key": key}
    if path == "/key/update":
        return {"key": key, **body}
    return body


@pytest.mark.parametrize(("method", "path", "body"), MANAGEMENT_ROUTES, ids=[f"{m} {p}" for m, p, _ in MANAGEMENT_ROUTES])
def test_management_without_a_key_is_401(gov, admin, method, path, body):
    target = admin.new_key()["key"]
    with Admin(gov, key=None) as anonymous:
        assert_error(anonymous.request(method, path, _route_body(path, body, target)), 401)


@pytest.mark.parametrize(("method", "path", "body"), MANAGEMENT_ROUTES, ids=[f"{m} {p}" for m, p, _ in MANAGEMENT_ROUTES])
def test_management_with_a_non_master_key_is_403(gov, admin, method, path, body):
    k = admin.new_key()
    with Admin(gov, key=k["key"]) as own:
        assert_error(own.request(method, path, _route_body(path, body, k["key"])), 403)
    assert admin.key_info(k["key"])["blocked"] is False  # nothing was done


@pytest.mark.parametrize(
    ("method", "path", "body", "params"),
    [
        ("GET", "/key/info", None, {"key": "sk-no-such-key-000000000000"}),
        ("POST", "/key/update", {"key": "sk-no-such-key-000000000000", "max_budget": 1}, {}),
        ("POST", "/key/delete", {"keys": ["sk-no-such-key-000000000000"]}, {}),
        ("POST", "/key/block", {"key": "sk-no-such-key-000000000000"}, {}),
        ("GET", "/team/info", None, {"team_id": "no-such-team"}),
        ("POST", "/team/update", {"team_id": "no-such-team", "max_budget": 1}, {}),
        ("POST", "/team/delete", {"team_ids": ["no-such-team"]}, {}),
        ("GET", "/user/info", None, {"user_id": "no-such-user"}),
    ],
    ids=lambda v: v if isinstance(v, str) and v.startswith("/") else None,
)
def test_unknown_key_team_or_user_is_404(admin, method, path, body, params):
    assert_error(admin.request(method, path, body, **params), 404)


# --------------------------------------------------------------------------- enforcement: keys


def test_unknown_key_is_401_invalid(gov):
    err = refused(gov, "sk-" + "x" * 32, openai.AuthenticationError)
    assert err.status_code == 401
    assert "invalid" in err.message.lower()


def test_expired_key_is_401_expired(gov, admin):
    k = admin.new_key(duration="1s")
    made = time.monotonic()
    assert call(gov, k["key"]).status_code == 200
    time.sleep(max(0.0, made + 1.5 - time.monotonic()))
    err = refused(gov, k["key"], openai.AuthenticationError)
    assert "expired" in err.message.lower()


def test_model_outside_the_keys_models_is_403(gov, admin):
    k = admin.new_key(models=[MODEL])
    assert call(gov, k["key"], model=MODEL).status_code == 200
    err = refused(gov, k["key"], openai.PermissionDeniedError, model=OTHER_MODEL)
    assert err.status_code == 403
    assert OTHER_MODEL in err.message


def test_model_outside_the_teams_models_is_403(gov, admin):
    team = admin.new_team(models=[MODEL])
    k = admin.new_key(team_id=team["team_id"])  # no models of its own
    assert call(gov, k["key"], model=MODEL).status_code == 200
    refused(gov, k["key"], openai.PermissionDeniedError, model=OTHER_MODEL)


def test_spend_headers_show_the_spend_before_the_call(gov, admin):
    k = admin.new_key(max_budget=1)
    first = call(gov, k["key"])
    assert float(first.headers["x-portcullis-key-spend"]) == 0
    assert float(first.headers["x-portcullis-key-max-budget"]) == 1
    second = call(gov, k["key"])
    assert math.isclose(float(second.headers["x-portcullis-key-spend"]), cost_of(first), rel_tol=1e-9)


def test_spend_header_without_a_budget(gov, admin):
    k = admin.new_key()
    raw = call(gov, k["key"])
    assert float(raw.headers["x-portcullis-key-spend"]) == 0
    assert "x-portcullis-key-max-budget" not in raw.headers


# --------------------------------------------------------------------------- enforcement: budgets


def assert_budget_refusal(err: openai.APIStatusError, status: int = 429) -> None:
    assert err.status_code == status
    assert err.code == "insufficient_quota"
    assert err.body["type"] == "budget_exceeded"
    assert err.response.headers.get("x-should-retry") == "false"


def test_key_budget_refuses_the_call_after_it_is_spent(gov, admin):
    k = admin.new_key(max_budget=TINY_BUDGET)
    assert call(gov, k["key"]).status_code == 200
    assert_budget_refusal(refused(gov, k["key"], openai.RateLimitError))


def test_a_streamed_call_counts_against_the_budget(gov, admin):
    k = admin.new_key(max_budget=TINY_BUDGET)
    with sdk(gov, k["key"]) as client:
        chunks = list(client.chat.completions.create(model=MODEL, messages=user("stream it"), stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "stream it"
    assert_budget_refusal(refused(gov, k["key"], openai.RateLimitError))


def test_zero_budget_refuses_the_first_call(gov, admin):
    # Spend 0 is already "at" a budget of 0.
    k = admin.new_key(max_budget=0)
    assert_budget_refusal(refused(gov, k["key"], openai.RateLimitError))


def test_sdk_does_not_retry_a_budget_refusal(gov, admin):
    k = admin.new_key(max_budget=TINY_BUDGET)
    sent: list[httpx.Request] = []
    http = httpx.Client(event_hooks={"request": [sent.append]})
    with sdk(gov, k["key"], max_retries=2, http_client=http) as client:
        client.chat.completions.create(model=MODEL, messages=user("first"))
        sent.clear()
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model=MODEL, messages=user("second"))
    assert len(sent) == 1


def test_budget_resets_when_its_period_ends(gov, admin):
    k = admin.new_key(max_budget=TINY_BUDGET, budget_duration="2s")
    made = time.monotonic()
    assert call(gov, k["key"]).status_code == 200
    assert_budget_refusal(refused(gov, k["key"], openai.RateLimitError))
    time.sleep(max(0.0, made + 2.3 - time.monotonic()))
    assert call(gov, k["key"]).status_code == 200


def test_team_budget_refuses_its_keys(gov, admin):
    team = admin.new_team(max_budget=TINY_BUDGET)
    k = admin.new_key(team_id=team["team_id"])
    assert call(gov, k["key"]).status_code == 200
    assert_budget_refusal(refused(gov, k["key"], openai.RateLimitError))


def test_team_budget_is_shared_by_its_keys(gov, admin):
    team = admin.new_team(max_budget=TINY_BUDGET)
    first, second = (admin.new_key(team_id=team["team_id"]) for _ in range(2))
    assert call(gov, first["key"]).status_code == 200
    assert_budget_refusal(refused(gov, second["key"], openai.RateLimitError))


def test_user_budget_refuses_their_keys(gov, admin):
    u = admin.new_user(max_budget=TINY_BUDGET)
    assert call(gov, u["key"]).status_code == 200
    assert_budget_refusal(refused(gov, u["key"], openai.RateLimitError))


def test_budget_refusal_can_be_422(gov_422):
    with Admin(gov_422) as admin:
        k = admin.new_key(max_budget=TINY_BUDGET)
    assert call(gov_422, k["key"]).status_code == 200
    assert_budget_refusal(refused(gov_422, k["key"], openai.UnprocessableEntityError), status=422)


# --------------------------------------------------------------------------- enforcement: rate limits


def assert_retry_after(err: openai.APIStatusError) -> float:
    h = err.response.headers
    ms = float(h["retry-after-ms"])
    assert ms > 0
    assert int(h["retry-after"]) == math.ceil(ms / 1000)
    return ms


def duration_ms(text: str) -> float:
    """Milliseconds in a reset header's duration ("850ms", "12s", "1m0s", "1h2m3s")."""
    assert DURATION.match(text), text
    units = {"h": 3_600_000, "m": 60_000, "s": 1000, "ms": 1}
    return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)(ms|h|m|s)", text))


def assert_ratelimit_headers(headers: httpx.Headers, kind: str, limit: int) -> int:
    """Checks one limit's three headers; returns what remains."""
    assert int(headers[f"x-ratelimit-limit-{kind}"]) == limit
    remaining = int(headers[f"x-ratelimit-remaining-{kind}"])
    assert 0 <= remaining <= limit
    duration_ms(headers[f"x-ratelimit-reset-{kind}"])
    return remaining


def test_rpm_limit_refuses_the_call_over_it(gov, admin):
    k = admin.new_key(rpm_limit=2)
    for _ in range(2):
        assert call(gov, k["key"]).status_code == 200
    err = refused(gov, k["key"], openai.RateLimitError)
    assert err.status_code == 429
    assert err.code == "rate_limit_exceeded"
    ms = assert_retry_after(err)
    # One request's allowance at 2 a minute takes 30 s to come back, less what refilled already.
    assert 20_000 < ms <= 30_500
    assert assert_ratelimit_headers(err.response.headers, "requests", 2) == 0


def test_ratelimit_headers_on_success(gov, admin):
    k = admin.new_key(rpm_limit=10, tpm_limit=1000)
    raw = call(gov, k["key"], max_tokens=5)
    assert assert_ratelimit_headers(raw.headers, "requests", 10) == 9
    assert assert_ratelimit_headers(raw.headers, "tokens", 1000) < 1000


def test_tpm_limit_refuses_a_long_prompt(gov, admin):
    # The reservation (prompt estimate + max_tokens) is far over 20 tokens.
    k = admin.new_key(tpm_limit=20)
    prompt = "lorem ipsum dolor sit amet " * 80
    with pytest.raises(openai.RateLimitError) as e:
        for _ in range(2):
            call(gov, k["key"], text=prompt, max_tokens=10)
    err = e.value
    assert err.status_code == 429
    assert err.code == "rate_limit_exceeded"
    assert_retry_after(err)
    assert_ratelimit_headers(err.response.headers, "tokens", 20)


@pytest.mark.parametrize(("limits", "kind"), [({"rpm_limit": 2}, "requests"), ({"tpm_limit": 20}, "tokens")])
def test_reset_header_is_not_sooner_than_retry_after(gov, admin, limits, kind):
    # "Full again" cannot come before "one more call fits": a client waiting for the reset
    # must not be refused again.
    k = admin.new_key(**limits)
    with pytest.raises(openai.RateLimitError) as e:
        for _ in range(3):
            call(gov, k["key"], text="lorem ipsum dolor sit amet " * 80, max_tokens=10)
    h = e.value.response.headers
    assert duration_ms(h[f"x-ratelimit-reset-{kind}"]) >= float(h["retry-after-ms"]) - 1000


def test_max_parallel_requests_refuses_the_second_concurrent_call(gov, admin, upstream):
    upstream.echo(delay_s=1)
    k = admin.new_key(max_parallel_requests=1)
    start = threading.Barrier(2)

    def attempt() -> int:
        start.wait()
        try:
            return call(gov, k["key"], model=SLOW_MODEL).status_code
        except openai.RateLimitError as err:
            return err.status_code

    with ThreadPoolExecutor(2) as pool:
        statuses = sorted(pool.map(lambda _: attempt(), range(2)))
    assert statuses == [200, 429]
    # The slot is given back when the call ends.
    upstream.echo()
    assert call(gov, k["key"], model=SLOW_MODEL).status_code == 200


def test_team_rpm_limit_is_shared_by_its_keys(gov, admin):
    team = admin.new_team(rpm_limit=2)
    first, second = (admin.new_key(team_id=team["team_id"]) for _ in range(2))
    assert call(gov, first["key"]).status_code == 200
    assert call(gov, second["key"]).status_code == 200
    err = refused(gov, first["key"], openai.RateLimitError)
    assert err.code == "rate_limit_exceeded"
    assert_retry_after(err)


def test_team_parallel_limit_is_shared_by_its_keys(gov, admin, upstream):
    upstream.echo(delay_s=1)
    team = admin.new_team(max_parallel_requests=1)
    keys = [admin.new_key(team_id=team["team_id"])["key"] for _ in range(2)]
    start = threading.Barrier(2)

    def attempt(key: str) -> int:
        start.wait()
        try:
            return call(gov, key, model=SLOW_MODEL).status_code
        except openai.RateLimitError as err:
            return err.status_code

    with ThreadPoolExecutor(2) as pool:
        assert sorted(pool.map(attempt, keys)) == [200, 429]


# --------------------------------------------------------------------------- spend logs


def test_spend_log_row_describes_the_call(gov, admin):
    team = admin.new_team()
    owner = admin.new_user()
    k = admin.new_key(team_id=team["team_id"], user_id=owner["user_id"])
    raw = call(gov, k["key"], "log me please", user="end-user-7")
    call_id = raw.headers["x-portcullis-call-id"]
    usage = raw.parse().usage
    [row] = admin.wait_spend_logs(1, request_id=call_id)
    assert SPEND_LOG_FIELDS <= set(row)
    assert row["request_id"] == call_id
    assert row["api_key"] == k["token"]
    assert math.isclose(row["spend"], cost_of(raw), rel_tol=1e-9)
    assert (row["prompt_tokens"], row["completion_tokens"], row["total_tokens"]) == (
        usage.prompt_tokens,
        usage.completion_tokens,
        usage.total_tokens,
    )
    assert row["model"] in (MODEL, "mock-echo")
    assert row["model_group"] == MODEL
    assert row["model_id"] == raw.headers["x-portcullis-model-id"]
    assert row["user"] == owner["user_id"]
    assert row["team_id"] == team["team_id"]
    assert row["end_user"] == "end-user-7"
    assert row["status"] == "success"
    start, end = parse_time(row["startTime"]), parse_time(row["endTime"])
    assert start <= end
    assert abs(end - datetime.now(timezone.utc)) < timedelta(minutes=1)


def test_spend_logs_filter_by_key_plaintext_or_hash(gov, admin):
    k = admin.new_key()
    ids = {call(gov, k["key"]).headers["x-portcullis-call-id"] for _ in range(2)}
    by_hash = admin.wait_spend_logs(2, api_key=k["token"])
    assert {r["request_id"] for r in by_hash} == ids
    assert {r["request_id"] for r in admin.spend_logs(api_key=k["key"])} == ids


def test_spend_logs_filter_by_user_and_team(gov, admin):
    team = admin.new_team()
    owner = admin.new_user()
    in_team = admin.new_key(team_id=team["team_id"])
    call(gov, in_team["key"])
    call(gov, owner["key"])
    [team_row] = admin.wait_spend_logs(1, team_id=team["team_id"])
    assert team_row["api_key"] == in_team["token"]
    [user_row] = admin.wait_spend_logs(1, user_id=owner["user_id"])
    assert user_row["api_key"] == sha256(owner["key"])


def test_spend_logs_filter_by_dates(gov, admin):
    k = admin.new_key()
    call(gov, k["key"])
    [row] = admin.wait_spend_logs(1, api_key=k["token"])
    when = parse_time(row["startTime"])
    day = when.date()
    minute = timedelta(minutes=1)

    def count(**dates: str) -> int:
        return len(admin.spend_logs(api_key=k["token"], **dates))

    assert count(start_date=day.isoformat(), end_date=(day + timedelta(days=1)).isoformat()) == 1
    assert count(start_date=(day + timedelta(days=1)).isoformat()) == 0
    assert count(end_date=(day - timedelta(days=1)).isoformat()) == 0
    assert count(start_date=(when - minute).isoformat(), end_date=(when + minute).isoformat()) == 1
    assert count(start_date=(when + minute).isoformat()) == 0


def test_spend_logs_record_a_failed_call(gov, admin, upstream):
    upstream.fail(500)
    k = admin.new_key()
    with pytest.raises(openai.InternalServerError):
        call(gov, k["key"], model=SLOW_MODEL)
    [row] = admin.wait_spend_logs(1, api_key=k["token"])
    assert row["status"] == "failure"
    assert row["spend"] == 0


# --------------------------------------------------------------------------- persistence


@needs_sqlite
def test_keys_and_spend_survive_a_restart(own_gateway):
    gw = own_gateway.gw
    assert (own_gateway.workdir / "portcullis.db").is_file()  # the default store, beside the config
    with Admin(gw) as admin:
        k = admin.new_key(max_budget=1, models=[MODEL])
        costs = [cost_of(call(gw, k["key"], f"call {i}")) for i in range(3)]
        before = eventually(
            lambda: admin.key_info(k["key"]),
            lambda info: math.isclose(info["spend"], sum(costs), rel_tol=1e-9),
            timeout=3,
        )
    assert math.isclose(before["spend"], sum(costs), rel_tol=1e-9)
    own_gateway.stop()
    gw = own_gateway.start()
    with Admin(gw) as admin:
        after = admin.key_info(k["key"])
    assert math.isclose(after["spend"], before["spend"], rel_tol=1e-9, abs_tol=1e-12)
    for name in ("token", "key_alias", "models", "max_budget", "created_at"):
        assert after[name] == before[name], name
    assert float(call(gw, k["key"]).headers["x-portcullis-key-spend"]) == pytest.approx(before["spend"], rel=1e-9)


@needs_sqlite
def test_the_database_file_never_holds_a_plaintext_key(own_gateway):
    gw = own_gateway.gw
    with Admin(gw) as admin:
        plain = admin.new_key()["key"]
        regenerated = admin.ok("POST", "/key/regenerate", {"key": admin.new_key()["key"]})["key"]
        users_key = admin.new_user()["key"]
        blocked = admin.new_key(blocked=True)["key"]
        secrets = [plain, regenerated, users_key, blocked]
        for key in (plain, regenerated, users_key):
            call(gw, key)
    own_gateway.stop()
    files = [own_gateway.workdir / f"portcullis.db{suffix}" for suffix in ("", "-wal", "-shm")]
    contents = {f.name: f.read_bytes() for f in files if f.exists()}
    assert "portcullis.db" in contents
    for name, data in contents.items():
        for secret in secrets:
            assert secret.encode() not in data, f"{name} contains a plaintext key"
            # The part after "sk-" is the secret; it must not be stored in any form either.
            assert secret[3:].encode() not in data, f"{name} contains a plaintext key's secret"


def test_spend_under_load_is_exact_after_a_restart(own_gateway):
    threads, calls_each = 8, 25
    gw = own_gateway.gw
    with Admin(gw) as admin:
        k = admin.new_key(key_alias=unique("load"))

    def work(worker: int) -> list[float]:
        with sdk(gw, k["key"]) as client:
            return [
                cost_of(
                    client.chat.completions.with_raw_response.create(
                        model=MODEL, messages=user(f"worker {worker} call {i} " + "word " * (i % 7))
                    )
                )
                for i in range(calls_each)
            ]

    with ThreadPoolExecutor(threads) as pool:
        costs = [c for batch in pool.map(work, range(threads)) for c in batch]
    assert len(costs) == threads * calls_each
    own_gateway.stop()
    gw = own_gateway.start()
    with Admin(gw) as admin:
        spend = admin.key_info(k["key"])["spend"]
        rows = admin.wait_spend_logs(len(costs), api_key=k["token"])
    assert math.isclose(spend, sum(costs), rel_tol=1e-9, abs_tol=1e-12)
    assert len(rows) == len(costs)
    assert len({r["request_id"] for r in rows}) == len(costs)
    assert math.isclose(sum(r["spend"] for r in rows), sum(costs), rel_tol=1e-9, abs_tol=1e-12)


def test_admin_status_reports_the_store(admin):
    store = admin.ok("GET", "/admin/status")["store"]
    expected = "postgres" if os.environ.get("PORTCULLIS_TEST_DATABASE_URL") else "sqlite"
    assert store["database"] == expected
    assert store["pending_spend_rows"] >= 0 and store["cached_keys"] >= 0
    assert store["dropped_spend_rows"] == 0
    assert store["redis"] is None  # not configured here; test_replicas.py covers it

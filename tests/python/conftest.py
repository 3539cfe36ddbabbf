"""Fixtures: a scriptable fake OpenAI upstream and one real Portcullis gateway for the session.

Modules that need a gateway of their own (own config, restarts) use `start_gateway`.

The gateway binary is the one `cargo build -p portcullis` produces; the suite never builds it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

REPO = Path(__file__).resolve().parents[2]

MASTER_KEY = "sk-master"
TEAM_A_KEY = "sk-team-a"
UPSTREAM_KEY = "sk-up"
UPSTREAM_MODEL = "up-model"
MAX_REQUEST_BYTES = 65536
# Explicit prices, so the cost header can be checked against the usage exactly.
INPUT_COST = 0.000001
OUTPUT_COST = 0.000002
# The `flaky` deployment's own timeout: short, so the 504 test stays fast.
FLAKY_TIMEOUT_S = 1.0
# Generous: a shared CI machine can stall for seconds. Each of the two waits (for the
# "listening" line, then for readiness) gets this long.
READY_TIMEOUT_S = 30.0


# --------------------------------------------------------------------------- fake upstream


@dataclass
class Behaviour:
    """What the fake upstream does with the next requests, until a test changes it."""

    mode: str = "echo"  # echo | error | drop | stream_error | stream_cut
    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    chunks_before_failure: int = 2


@dataclass
class SeenRequest:
    path: str
    headers: dict[str, str]
    body: Any


class FakeUpstream:
    """Control handle for the fake upstream: tests set its behaviour and read what it received."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._behaviour = Behaviour()
        self._requests: list[SeenRequest] = []
        self.server: ThreadingHTTPServer | None = None

    @property
    def base_url(self) -> str:
        assert self.server is not None
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/v1"

    # -- behaviour setters, one per kind of upstream the tests need

    def reset(self) -> None:
        with self._lock:
            self._behaviour = Behaviour()
            self._requests.clear()

    def echo(self, delay_s: float = 0.0) -> None:
        """Answer normally (JSON or SSE, as the request asks), optionally after a delay."""
        self._set(Behaviour(mode="echo", delay_s=delay_s))

    def fail(self, status: int, body: Any = None, headers: dict[str, str] | None = None) -> None:
        """Answer every request with this status and body (an OpenAI error object by default)."""
        if body is None:
            body = {
                "error": {
                    "message": f"fake upstream failure {status}",
                    "type": "server_error" if status >= 500 else "invalid_request_error",
                    "param": None,
                    "code": None,
                }
            }
        self._set(Behaviour(mode="error", status=status, body=body, headers=dict(headers or {})))

    def drop_connection(self) -> None:
        """Close the connection without answering: a connection error to the gateway."""
        self._set(Behaviour(mode="drop"))

    def stream_error_after(self, chunks: int = 2, message: str = "upstream exploded") -> None:
        """Stream `chunks` good chunks, then a `data: {"error": ...}` frame."""
        body = {"error": {"message": message, "type": "server_error", "param": None, "code": None}}
        self._set(Behaviour(mode="stream_error", body=body, chunks_before_failure=chunks))

    def stream_cut_after(self, chunks: int = 2) -> None:
        """Stream `chunks` good chunks, then close the socket mid-body (no terminating chunk)."""
        self._set(Behaviour(mode="stream_cut", chunks_before_failure=chunks))

    def _set(self, behaviour: Behaviour) -> None:
        with self._lock:
            self._behaviour = behaviour

    # -- for the handler and the tests

    def behaviour(self) -> Behaviour:
        with self._lock:
            return self._behaviour

    def record(self, seen: SeenRequest) -> None:
        with self._lock:
            self._requests.append(seen)

    @property
    def requests(self) -> list[SeenRequest]:
        with self._lock:
            return list(self._requests)


def _last_user_text(body: dict) -> str:
    for message in reversed(body.get("messages") or []):
        if message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def _usage(prompt: str, completion: str) -> dict:
    p, c = len(prompt.split()), len(completion.split())
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _chunk(model: str, delta: dict | None, finish: str | None = None, usage: dict | None = None) -> dict:
    chunk = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": model,
        "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    if usage is not None:
        chunk["usage"] = usage
    return chunk


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 so the gateway's pooled keep-alive connections and chunked streams behave as real.
    protocol_version = "HTTP/1.1"
    fake: FakeUpstream  # set on the subclass built per server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # keep pytest output clean

    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            body = None
        self.fake.record(SeenRequest(self.path, {k.lower(): v for k, v in self.headers.items()}, body))
        b = self.fake.behaviour()
        if b.delay_s:
            time.sleep(b.delay_s)
        if b.mode == "drop":
            self._abort()
            return
        if b.mode == "error":
            self._send_json(b.status, b.body, b.headers)
            return
        if not isinstance(body, dict):
            self._send_json(400, {"error": {"message": "fake upstream: body is not JSON", "type": "x"}})
            return
        text = _last_user_text(body)
        model = body.get("model", "")
        if not body.get("stream"):
            self._send_json(
                200,
                {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion",
                    "created": 1_700_000_000,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": text},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": _usage(json.dumps(body.get("messages")), text),
                },
            )
            return
        self._stream(body, text, model, b)

    def _stream(self, body: dict, text: str, model: str, b: Behaviour) -> None:
        pieces = [_chunk(model, {"role": "assistant", "content": ""})]
        pieces += [_chunk(model, {"content": w}) for w in re.findall(r"\s*\S+", text)]
        pieces.append(_chunk(model, {}, finish="stop"))
        if (body.get("stream_options") or {}).get("include_usage"):
            pieces.append(_chunk(model, None, usage=_usage(json.dumps(body.get("messages")), text)))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if b.mode in ("stream_error", "stream_cut"):
            pieces = pieces[: b.chunks_before_failure]
        for piece in pieces:
            self._write_chunk(f"data: {json.dumps(piece)}\n\n".encode())
        if b.mode == "stream_cut":
            self._abort()
            return
        if b.mode == "stream_error":
            self._write_chunk(f"data: {json.dumps(b.body)}\n\n".encode())
        else:
            self._write_chunk(b"data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()
        # Separate TCP writes, so the gateway really sees the chunks arrive one by one.
        time.sleep(0.01)

    def _send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode() if not isinstance(payload, (bytes, str)) else (
            payload.encode() if isinstance(payload, str) else payload
        )
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def _abort(self) -> None:
        """Drop the TCP connection on the spot, mid-response if one was started."""
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # The gateway hangs up on timeouts and aborted streams; that is expected, not news.
        pass


@pytest.fixture(scope="session")
def fake_upstream() -> FakeUpstream:
    fake = FakeUpstream()
    handler = type("Handler", (_Handler,), {"fake": fake})
    server = _QuietServer(("127.0.0.1", 0), handler)
    fake.server = server
    thread = threading.Thread(target=server.serve_forever, name="fake-upstream", daemon=True)
    thread.start()
    yield fake
    server.shutdown()
    server.server_close()


@pytest.fixture
def upstream(fake_upstream: FakeUpstream) -> FakeUpstream:
    """The fake upstream, reset to plain echo with an empty request log for this test."""
    fake_upstream.reset()
    yield fake_upstream
    fake_upstream.reset()


# --------------------------------------------------------------------------- the gateway


def _binary() -> Path:
    env = os.environ.get("PORTCULLIS_BIN")
    # An explicit choice is not second-guessed: a wrong PORTCULLIS_BIN fails rather than falls back.
    candidates = (
        [Path(env)]
        if env
        else [REPO / "target" / "debug" / "portcullis", REPO / "target" / "release" / "portcullis"]
    )
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    pytest.fail(
        "portcullis binary not found (looked at "
        + ", ".join(str(p) for p in candidates)
        + "); build it first: cargo build -p portcullis",
        pytrace=False,
    )


def _config(upstream_base: str) -> dict:
    return {
        "server": {
            "listen": "127.0.0.1:0",  # the gateway prints the port it picked
            "max_request_bytes": MAX_REQUEST_BYTES,
            "shutdown_drain_s": 2,
        },
        "auth": {
            "master_key": MASTER_KEY,
            "keys": [{"key": TEAM_A_KEY, "alias": "team-a", "models": ["gpt-4o-mini"]}],
        },
        "models": [
            {
                "name": "gpt-4o-mini",
                "provider": "mock",
                "model": "mock-echo",
                "input_cost_per_token": INPUT_COST,
                "output_cost_per_token": OUTPUT_COST,
            },
            {"name": "mock-embeddings", "provider": "mock"},
            {
                "name": "flaky",
                "provider": "openai_compatible",
                "model": UPSTREAM_MODEL,
                "api_base": upstream_base,
                "api_key": UPSTREAM_KEY,
                "timeout_s": FLAKY_TIMEOUT_S,
            },
        ],
        "router": {
            "num_retries": 0,
            "timeout_s": 2,
            "allowed_fails": 100,  # the error tests must not put `flaky` into cooldown
            "cooldown_s": 1,
            "fallbacks": {},
        },
    }


@dataclass
class Gateway:
    url: str  # http://127.0.0.1:PORT, without /v1
    process: subprocess.Popen
    stderr_path: Path
    config: dict = field(default_factory=dict)
    workdir: Path | None = None

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stop(self) -> None:
        """Graceful stop; fails the test unless the gateway exits 0."""
        stop_gracefully(self.process, self.stderr)

    def restart(self) -> "Gateway":
        """Stops this gateway and starts a new one on the same config and directory."""
        self.stop()
        assert self.workdir is not None
        return start_gateway(self.config, self.workdir)


def start_gateway(config: dict, workdir: Path) -> Gateway:
    """Writes `config` into `workdir`, starts the gateway on it and returns it once ready.

    Starting again on the same directory reuses the config file and anything the gateway stored
    beside it; each start logs to its own file, so the "listening" line found is this start's.
    """
    binary = _binary()
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "portcullis.yaml"
    # JSON is valid YAML, so no YAML library is needed to write it.
    config_path.write_text(json.dumps(config, indent=2))
    starts = len(list(workdir.glob("stderr*.log")))
    stderr_path = workdir / ("stderr.log" if starts == 0 else f"stderr.{starts}.log")
    env = dict(os.environ, PORTCULLIS_LOG=os.environ.get("PORTCULLIS_LOG", "info"))
    with open(stderr_path, "wb") as stderr:
        # Logs go to a file, not a pipe: a pipe nobody drains would block the gateway.
        process = subprocess.Popen(
            [str(binary), "--config", str(config_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=env,
        )
    gw = Gateway(url="", process=process, stderr_path=stderr_path, config=config, workdir=workdir)

    def give_up(why: str) -> None:
        threads = thread_states(process.pid)
        if process.poll() is None:
            process.kill()
            process.wait()
        pytest.fail(
            f"gateway did not become ready: {why}\n--- gateway threads ---\n{threads}"
            f"\n--- gateway stderr ---\n{gw.stderr()}",
            pytrace=False,
        )

    deadline = time.monotonic() + READY_TIMEOUT_S
    while not gw.url:
        match = re.search(r"portcullis listening on (http://\S+)", gw.stderr())
        if match:
            gw.url = match.group(1).rstrip("/")
        elif process.poll() is not None:
            give_up(f"it exited with status {process.returncode}")
        elif time.monotonic() > deadline:
            give_up(f"no 'listening' line within {READY_TIMEOUT_S:.0f}s")
        else:
            time.sleep(0.05)
    deadline = time.monotonic() + READY_TIMEOUT_S
    probes, last = 0, "no answer yet"
    while True:
        probes += 1
        try:
            r = httpx.get(f"{gw.url}/health/readiness", timeout=1)
            if r.status_code == 200 and r.json() == {"status": "ready"}:
                break
            last = f"{r.status_code} {r.text[:200]}"
        except httpx.HTTPError as e:
            last = f"{type(e).__name__}: {e}"
        if process.poll() is not None:
            give_up(f"it exited with status {process.returncode}")
        if time.monotonic() > deadline:
            give_up(
                f"/health/readiness not 200 within {READY_TIMEOUT_S:.0f}s of listening "
                f"({probes} probes; the last: {last})"
            )
        time.sleep(0.05)
    return gw


def thread_states(pid: int) -> str:
    """Each thread's name, state and kernel wait channel, to tell a hang from a stall."""
    lines = []
    for task in sorted(Path(f"/proc/{pid}/task").glob("*")):
        try:
            name = (task / "comm").read_text().strip()
            state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
            wchan = (task / "wchan").read_text().strip() or "-"
        except OSError:
            continue
        lines.append(f"{task.name} {name} {state} {wchan}")
    return "\n".join(lines) or "(none readable)"


def finish_gateway(gw: Gateway) -> None:
    """Fixture teardown: the gateway must have survived its tests and must stop gracefully."""
    if gw.process.poll() is not None:
        pytest.fail(f"the gateway died during the tests (status {gw.process.returncode})\n{gw.stderr()}", pytrace=False)
    gw.stop()


@pytest.fixture(scope="session")
def gateway(fake_upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Gateway:
    gw = start_gateway(_config(fake_upstream.base_url), tmp_path_factory.mktemp("gateway"))
    yield gw
    finish_gateway(gw)


@pytest.fixture
def client(gateway: Gateway) -> openai.OpenAI:
    with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=TEAM_A_KEY, max_retries=0, timeout=10) as c:
        yield c


@pytest.fixture
def master_client(gateway: Gateway) -> openai.OpenAI:
    with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=MASTER_KEY, max_retries=0, timeout=10) as c:
        yield c


def stop_gracefully(process: subprocess.Popen, logs) -> None:
    """SIGTERM, then fails the test unless the gateway exits 0 within 10 s; `logs()` explains."""
    process.send_signal(signal.SIGTERM)
    try:
        status = process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        pytest.fail(f"the gateway ignored SIGTERM for 10s\n{logs()}", pytrace=False)
    if status != 0:
        pytest.fail(f"the gateway exited with status {status} after SIGTERM\n{logs()}", pytrace=False)

"""The official `openai` SDK, unmodified, against a real Portcullis gateway.

Each test says what an SDK user relies on: the shapes the SDK parses, and that each gateway error
raises the exception class the SDK documents for it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import struct

import httpx
import openai
import pytest

from conftest import (
    FLAKY_TIMEOUT_S,
    INPUT_COST,
    MASTER_KEY,
    MAX_REQUEST_BYTES,
    OUTPUT_COST,
    TEAM_A_KEY,
    UPSTREAM_KEY,
    UPSTREAM_MODEL,
)

MODEL = "gpt-4o-mini"


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# --------------------------------------------------------------------------- chat


def test_chat_echoes_with_requested_model_and_consistent_usage(client):
    text = "The quick brown fox jumps over the lazy dog"
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "be brief"}, *user(text)],
    )
    assert r.object == "chat.completion"
    assert r.model == MODEL  # not the deployment's `mock-echo`
    assert len(r.choices) == 1
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == text
    assert r.choices[0].finish_reason == "stop"
    u = r.usage
    assert u is not None
    assert u.prompt_tokens > 0 and u.completion_tokens > 0
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    # The prompt includes the system message, so it counts more than the echoed answer.
    assert u.prompt_tokens > u.completion_tokens


def test_chat_usage_grows_with_the_text(client):
    short = client.chat.completions.create(model=MODEL, messages=user("hi"))
    long = client.chat.completions.create(model=MODEL, messages=user("hi " * 50))
    assert long.usage.completion_tokens > short.usage.completion_tokens
    assert long.usage.prompt_tokens > short.usage.prompt_tokens


def test_chat_raw_response_headers(client):
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=user("headers please"))
    assert raw.status_code == 200
    h = raw.headers
    assert h.get("x-portcullis-call-id")
    assert h["x-portcullis-model-group"] == MODEL
    assert h.get("x-portcullis-model-id")
    completion = raw.parse()
    assert completion.choices[0].message.content == "headers please"
    # Cost = usage x the configured prices.
    u = completion.usage
    expected = u.prompt_tokens * INPUT_COST + u.completion_tokens * OUTPUT_COST
    assert float(h["x-portcullis-response-cost"]) == pytest.approx(expected, abs=1e-9)
    assert expected > 0


def test_call_ids_are_unique(client):
    ids = {
        client.chat.completions.with_raw_response.create(model=MODEL, messages=user("x")).headers[
            "x-portcullis-call-id"
        ]
        for _ in range(3)
    }
    assert len(ids) == 3


def test_chat_stream_assembles_the_echo_without_usage_by_default(client):
    text = "streaming is   fun\nand fast"
    stream = client.chat.completions.create(model=MODEL, messages=user(text), stream=True)
    chunks = list(stream)
    assert len(chunks) > 2  # really streamed, not one blob
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert all(c.model == MODEL for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)  # no usage-only chunk either
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_chat_stream_include_usage_puts_usage_last(client):
    text = "count my tokens please"
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=user(text),
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens > 0
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == text
    # Same counts as the non-streaming call of the same request.
    whole = client.chat.completions.create(model=MODEL, messages=user(text))
    assert last.usage.model_dump() == whole.usage.model_dump()


def test_chat_stream_raw_response_headers(client):
    with client.chat.completions.with_streaming_response.create(
        model=MODEL, messages=user("hello there"), stream=True
    ) as raw:
        assert raw.headers["content-type"].startswith("text/event-stream")
        assert raw.headers["x-portcullis-model-group"] == MODEL
        assert raw.headers.get("x-portcullis-call-id")
        text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    assert text == "hello there"


# --------------------------------------------------------------------------- completions


def test_legacy_completions(client):
    r = client.completions.create(model=MODEL, prompt="Once upon a time")
    assert r.object == "text_completion"
    assert r.model == MODEL
    assert r.choices[0].text == "Once upon a time"
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_legacy_completions_stream(client):
    chunks = list(client.completions.create(model=MODEL, prompt="one two three", stream=True))
    assert all(c.model == MODEL for c in chunks)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "one two three"


# --------------------------------------------------------------------------- embeddings


def test_embeddings_shape_and_determinism(master_client):
    inputs = ["alpha", "beta", "gamma"]
    first = master_client.embeddings.create(model="mock-embeddings", input=inputs)
    assert first.object == "list"
    assert first.model == "mock-embeddings"
    assert [d.index for d in first.data] == [0, 1, 2]
    for d in first.data:
        assert len(d.embedding) == 8
        assert math.isclose(sum(x * x for x in d.embedding), 1.0, rel_tol=1e-6)
    assert first.data[0].embedding != first.data[1].embedding
    again = master_client.embeddings.create(model="mock-embeddings", input=inputs)
    assert [d.embedding for d in again.data] == [d.embedding for d in first.data]
    assert first.usage.prompt_tokens > 0


def test_embeddings_do_not_depend_on_batching(master_client):
    # A text's vector (and token count) must be the same alone or inside a batch.
    batch = master_client.embeddings.create(model="mock-embeddings", input=["alpha", "beta"])
    single = master_client.embeddings.create(model="mock-embeddings", input="beta")
    assert single.data[0].embedding == batch.data[1].embedding
    alpha = master_client.embeddings.create(model="mock-embeddings", input="alpha")
    assert batch.usage.prompt_tokens == alpha.usage.prompt_tokens + single.usage.prompt_tokens


def test_embeddings_token_id_input_is_one_input(master_client):
    # OpenAI: a flat list of ints is ONE tokenized input; a list of lists is a batch.
    one = master_client.embeddings.create(model="mock-embeddings", input=[101, 2023, 102])
    assert len(one.data) == 1
    two = master_client.embeddings.create(model="mock-embeddings", input=[[101, 2023], [101, 2024]])
    assert len(two.data) == 2


def test_embeddings_dimensions(master_client):
    r = master_client.embeddings.create(model="mock-embeddings", input="hello", dimensions=32)
    assert len(r.data[0].embedding) == 32


def test_embeddings_explicit_float_format(master_client):
    r = master_client.embeddings.create(model="mock-embeddings", input="hello", encoding_format="float")
    assert isinstance(r.data[0].embedding, list) and len(r.data[0].embedding) == 8


def test_embeddings_explicit_base64_format(master_client):
    # The SDK leaves the data untouched when the caller names a format: OpenAI then sends a
    # base64 string of little-endian float32s.
    r = master_client.embeddings.create(model="mock-embeddings", input="hello", encoding_format="base64")
    data = r.data[0].embedding
    assert isinstance(data, str), f"expected a base64 string, got {type(data).__name__}: {data!r}"
    floats = struct.unpack("<8f", base64.b64decode(data))
    assert math.isclose(sum(x * x for x in floats), 1.0, rel_tol=1e-5)


# --------------------------------------------------------------------------- models


def test_models_list_for_team_key(client):
    ids = [m.id for m in client.models.list()]
    assert ids == [MODEL]


def test_models_list_for_master_key(master_client):
    models = list(master_client.models.list())
    assert sorted(m.id for m in models) == sorted([MODEL, "mock-embeddings", "flaky"])
    assert all(m.object == "model" for m in models)


def test_models_retrieve(client):
    assert client.models.retrieve(MODEL).id == MODEL
    # A model the key may not use is reported as absent, not as forbidden.
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("mock-embeddings")
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


# --------------------------------------------------------------------------- base URL, async


def test_base_url_without_v1(gateway):
    with openai.OpenAI(base_url=gateway.url, api_key=TEAM_A_KEY, max_retries=0, timeout=10) as root:
        r = root.chat.completions.create(model=MODEL, messages=user("no prefix"))
        assert r.choices[0].message.content == "no prefix"
        assert [m.id for m in root.models.list()] == [MODEL]
    raw = httpx.post(
        f"{gateway.url}/embeddings",
        headers={"Authorization": f"Bearer {MASTER_KEY}"},
        json={"model": "mock-embeddings", "input": "x"},
    )
    assert raw.status_code == 200
    assert len(raw.json()["data"][0]["embedding"]) == 8


def test_async_client_chat_and_stream(gateway):
    async def run():
        async with openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key=TEAM_A_KEY, max_retries=0, timeout=10) as c:
            whole, stream = await asyncio.gather(
                c.chat.completions.create(model=MODEL, messages=user("async hello")),
                c.chat.completions.create(
                    model=MODEL,
                    messages=user("async stream"),
                    stream=True,
                    stream_options={"include_usage": True},
                ),
            )
            chunks = [chunk async for chunk in stream]
            return whole, chunks

    whole, chunks = asyncio.run(run())
    assert whole.model == MODEL
    assert whole.choices[0].message.content == "async hello"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "async stream"
    assert chunks[-1].usage is not None and chunks[-1].choices == []


# --------------------------------------------------------------------------- through a real upstream


def test_upstream_passthrough_chat(master_client, upstream):
    r = master_client.chat.completions.create(model="flaky", messages=user("via upstream"), temperature=0.5)
    assert r.model == "flaky"
    assert r.choices[0].message.content == "via upstream"
    [seen] = upstream.requests
    assert seen.path == "/v1/chat/completions"
    assert seen.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert seen.body["model"] == UPSTREAM_MODEL
    assert seen.body["temperature"] == 0.5


def test_upstream_passthrough_stream_hides_usage_unless_asked(master_client, upstream):
    chunks = list(master_client.chat.completions.create(model="flaky", messages=user("a b c"), stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "a b c"
    assert all(c.model == "flaky" for c in chunks)
    assert all(c.usage is None for c in chunks)
    # The gateway asks the upstream for usage anyway (it needs it for cost).
    assert upstream.requests[0].body["stream_options"]["include_usage"] is True


# --------------------------------------------------------------------------- client errors


def _no_retry_header(err: openai.APIStatusError) -> None:
    assert err.response.headers.get("x-should-retry") == "false"


def test_invalid_role_is_bad_request_naming_the_field(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "wizard", "content": "hi"}])
    assert e.value.status_code == 400
    assert e.value.body["param"] == "messages[0].role"
    assert e.value.body["type"] == "invalid_request_error"
    assert "messages[0].role" in e.value.message
    _no_retry_header(e.value)


def test_missing_field_is_bad_request(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "ok"}, {"role": "user"}]
        )
    assert e.value.body["param"] == "messages[1].content"


def test_out_of_range_parameter_is_bad_request(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=user("hi"), temperature=5)
    assert e.value.body["param"] == "temperature"


def test_invalid_json_is_bad_request(gateway):
    r = httpx.post(
        f"{gateway.url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {TEAM_A_KEY}", "Content-Type": "application/json"},
        content=b'{"model": "gpt-4o-mini", "messages": [',
    )
    assert r.status_code == 400
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error"
    assert "JSON" in err["message"]
    assert r.headers.get("x-should-retry") == "false"


def test_unknown_key_is_authentication_error(gateway):
    with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="sk-nope", max_retries=0, timeout=10) as c:
        with pytest.raises(openai.AuthenticationError) as e:
            c.chat.completions.create(model=MODEL, messages=user("hi"))
    assert e.value.status_code == 401
    assert e.value.code == "invalid_api_key"
    assert "sk-nope" not in e.value.message  # the key itself is never echoed
    _no_retry_header(e.value)


def test_missing_key_is_authentication_error(gateway):
    r = httpx.post(f"{gateway.url}/v1/chat/completions", json={"model": MODEL, "messages": user("hi")})
    assert r.status_code == 401
    assert "missing API key" in r.json()["error"]["message"]
    # The SDK refuses an empty api_key, so strip the header it would send instead.
    with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=10) as c:
        with pytest.raises(openai.AuthenticationError) as e:
            c.models.list(extra_headers={"Authorization": openai.omit})
    assert "missing API key" in e.value.message


def test_model_not_allowed_for_key_is_permission_denied(client):
    with pytest.raises(openai.PermissionDeniedError) as e:
        client.embeddings.create(model="mock-embeddings", input="hi")
    assert e.value.status_code == 403
    assert "mock-embeddings" in e.value.message
    _no_retry_header(e.value)


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=user("hi"))
    assert e.value.status_code == 404
    assert e.value.code == "model_not_found"
    assert "no-such-model" in e.value.message
    _no_retry_header(e.value)


def test_body_over_limit_is_413(client):
    huge = "x" * (MAX_REQUEST_BYTES * 2)
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model=MODEL, messages=user(huge))
    assert e.value.status_code == 413
    assert e.value.code == "request_too_large"
    assert str(MAX_REQUEST_BYTES) in e.value.message
    _no_retry_header(e.value)


def test_chunked_body_over_limit_is_413(gateway):
    # No Content-Length: the limit must hold while reading, too.
    payload = json.dumps({"model": MODEL, "messages": user("y" * (MAX_REQUEST_BYTES * 2))}).encode()

    def pieces():
        for i in range(0, len(payload), 8192):
            yield payload[i : i + 8192]

    r = httpx.post(
        f"{gateway.url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {TEAM_A_KEY}", "Content-Type": "application/json"},
        content=pieces(),
    )
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large"


def test_sdk_does_not_retry_client_errors(gateway):
    # x-should-retry: false must stop the SDK's default retries: one request, not three.
    sent = []
    http = httpx.Client(event_hooks={"request": [sent.append]})
    with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=TEAM_A_KEY, max_retries=2, http_client=http, timeout=10) as c:
        with pytest.raises(openai.NotFoundError):
            c.chat.completions.create(model="no-such-model", messages=user("hi"))
    assert len(sent) == 1


# --------------------------------------------------------------------------- upstream errors


def test_upstream_429_is_rate_limit_error(master_client, upstream):
    upstream.fail(
        429,
        {"error": {"message": "slow down, fake", "type": "rate_limit_error", "code": "rate_limit_exceeded"}},
        headers={"retry-after": "7"},
    )
    with pytest.raises(openai.RateLimitError) as e:
        master_client.chat.completions.create(model="flaky", messages=user("hi"))
    assert e.value.status_code == 429
    assert e.value.code == "rate_limit_exceeded"
    assert e.value.body["type"] == "rate_limit_error"
    assert "slow down, fake" in e.value.message
    assert e.value.response.headers.get("retry-after") == "7"
    assert e.value.response.headers.get("x-should-retry") != "false"
    assert len(upstream.requests) == 1  # num_retries: 0


def test_upstream_500_is_502(master_client, upstream):
    upstream.fail(500)
    with pytest.raises(openai.InternalServerError) as e:
        master_client.chat.completions.create(model="flaky", messages=user("hi"))
    assert e.value.status_code == 502
    assert e.value.body["type"] == "api_error"
    assert "fake upstream failure 500" in e.value.message


def test_upstream_connection_error_is_502(master_client, upstream):
    upstream.drop_connection()
    with pytest.raises(openai.InternalServerError) as e:
        master_client.chat.completions.create(model="flaky", messages=user("hi"))
    assert e.value.status_code == 502


def test_upstream_503_is_503(master_client, upstream):
    upstream.fail(503)
    with pytest.raises(openai.InternalServerError) as e:
        master_client.chat.completions.create(model="flaky", messages=user("hi"))
    assert e.value.status_code == 503


def test_upstream_timeout_is_504(master_client, upstream):
    upstream.echo(delay_s=FLAKY_TIMEOUT_S + 1.5)
    with pytest.raises(openai.InternalServerError) as e:
        master_client.chat.completions.create(model="flaky", messages=user("hi"))
    assert e.value.status_code == 504
    assert e.value.code == "timeout"


def test_upstream_slow_but_in_time_succeeds(master_client, upstream):
    upstream.echo(delay_s=FLAKY_TIMEOUT_S / 4)
    r = master_client.chat.completions.create(model="flaky", messages=user("patience"))
    assert r.choices[0].message.content == "patience"


def test_upstream_401_is_not_the_clients_auth_error(master_client, upstream):
    # The upstream refusing the gateway's key is a gateway problem, not the caller's bad key.
    upstream.fail(401, {"error": {"message": "bad upstream key", "type": "invalid_request_error"}})
    with pytest.raises(openai.InternalServerError) as e:
        master_client.chat.completions.create(model="flaky", messages=user("hi"))
    assert e.value.status_code == 502


def test_upstream_error_before_first_chunk_is_a_status_error(master_client, upstream):
    # A stream that fails before its first chunk gets a real error status, not a 200 stream.
    upstream.fail(500)
    with pytest.raises(openai.InternalServerError) as e:
        master_client.chat.completions.create(model="flaky", messages=user("hi"), stream=True)
    assert e.value.status_code == 502


def test_sdk_retries_server_errors(gateway, upstream):
    # No x-should-retry on 5xx: the SDK's own retry policy applies.
    upstream.fail(503)
    with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=MASTER_KEY, max_retries=1, timeout=10) as c:
        with pytest.raises(openai.InternalServerError):
            c.chat.completions.create(model="flaky", messages=user("hi"))
    assert len(upstream.requests) == 2


# --------------------------------------------------------------------------- mid-stream failures


def _read_until_error(stream) -> tuple[list[str], BaseException | None]:
    texts: list[str] = []
    try:
        for chunk in stream:
            if chunk.choices:
                texts.append(chunk.choices[0].delta.content or "")
    except openai.APIError as err:
        return texts, err
    return texts, None


def test_mid_stream_error_frame_raises_api_error(master_client, upstream):
    upstream.stream_error_after(chunks=2, message="upstream exploded")
    stream = master_client.chat.completions.create(
        model="flaky", messages=user("partial answer here"), stream=True
    )
    texts, err = _read_until_error(stream)
    assert err is not None, "the stream ended without an error"
    assert "".join(texts) == "partial"  # the chunks before the failure were delivered
    assert "upstream exploded" in err.message
    assert isinstance(err.body, dict) and err.body.get("type") == "api_error"


def test_mid_stream_connection_cut_raises_api_error(master_client, upstream):
    upstream.stream_cut_after(chunks=2)
    stream = master_client.chat.completions.create(
        model="flaky", messages=user("cut me off"), stream=True
    )
    texts, err = _read_until_error(stream)
    assert err is not None, "the stream ended without an error"
    assert "".join(texts) == "cut"


def test_async_mid_stream_error_raises_api_error(gateway, upstream):
    upstream.stream_error_after(chunks=2)

    async def run():
        async with openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key=MASTER_KEY, max_retries=0, timeout=10) as c:
            stream = await c.chat.completions.create(model="flaky", messages=user("async partial"), stream=True)
            got = []
            with pytest.raises(openai.APIError):
                async for chunk in stream:
                    if chunk.choices:
                        got.append(chunk.choices[0].delta.content or "")
            return got

    assert "".join(asyncio.run(run())) == "async"


def test_gateway_still_healthy_after_upstream_failures(gateway, client):
    # Runs last in file order: the failures above must not have hurt the mock groups.
    assert httpx.get(f"{gateway.url}/health/readiness").json() == {"status": "ready"}
    assert client.chat.completions.create(model=MODEL, messages=user("still here")).choices[0].message.content == "still here"

"""The loopback embeddings server, driven by the real openai SDK."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import numpy as np
import openai
import pytest

from tests.fake_openai import FakeEmbeddingsServer, Fault, FaultKind

DIMENSIONS = 64
MODEL = "text-embedding-3-small"
TEXTS = ["alpha", "beta gamma", "delta\nepsilon"]


@pytest.fixture
def server() -> Iterator[FakeEmbeddingsServer]:
    with FakeEmbeddingsServer(dimensions=DIMENSIONS) as running:
        yield running


def sync_client(
    server: FakeEmbeddingsServer,
    *,
    max_retries: int = 0,
    timeout: float = 5.0,
    api_key: str = "test-key",
) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=api_key, max_retries=max_retries, timeout=timeout)


def async_client(
    server: FakeEmbeddingsServer, *, max_retries: int = 0, timeout: float = 5.0
) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=server.base_url, api_key="test-key", max_retries=max_retries, timeout=timeout
    )


def embed(server: FakeEmbeddingsServer, texts: list[str], *, max_retries: int = 0) -> None:
    with sync_client(server, max_retries=max_retries) as client:
        client.embeddings.create(input=texts, model=MODEL)


def post_raw(server: FakeEmbeddingsServer, path: str, headers: dict[str, str]) -> int:
    body = json.dumps({"model": MODEL, "input": ["alpha"]}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.port}{path}", data=body, headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        error.close()
        return error.code


def test_sdk_default_base64_decodes_to_the_servers_vectors(server: FakeEmbeddingsServer) -> None:
    with sync_client(server) as client:
        response = client.embeddings.create(input=TEXTS, model=MODEL)

    assert [item.embedding for item in response.data] == [
        server.vector_for(text, DIMENSIONS) for text in TEXTS
    ]
    assert [item.index for item in response.data] == [0, 1, 2]
    assert response.model == MODEL
    assert response.usage.prompt_tokens == response.usage.total_tokens > 0
    assert server.requests[0].encoding_format == "base64"


def test_float_format_returns_the_same_vectors(server: FakeEmbeddingsServer) -> None:
    with sync_client(server) as client:
        response = client.embeddings.create(input=TEXTS, model=MODEL, encoding_format="float")

    assert [item.embedding for item in response.data] == [
        server.vector_for(text, DIMENSIONS) for text in TEXTS
    ]
    assert server.requests[0].encoding_format == "float"


def test_explicit_base64_is_left_encoded_by_the_sdk(server: FakeEmbeddingsServer) -> None:
    with sync_client(server) as client:
        response = client.embeddings.create(input="alpha", model=MODEL, encoding_format="base64")

    encoded = response.data[0].embedding
    assert isinstance(encoded, str)
    decoded = np.frombuffer(base64.b64decode(encoded), dtype="<f4").tolist()
    assert decoded == server.vector_for("alpha", DIMENSIONS)


def test_vectors_are_unit_length_and_differ_per_text() -> None:
    alpha = np.array(FakeEmbeddingsServer.vector_for("alpha", 256))
    beta = np.array(FakeEmbeddingsServer.vector_for("beta", 256))

    assert np.linalg.norm(alpha) == pytest.approx(1.0, abs=1e-5)
    assert abs(float(alpha @ beta)) < 0.5


def test_requested_dimensions_are_honoured(server: FakeEmbeddingsServer) -> None:
    with sync_client(server) as client:
        response = client.embeddings.create(input=TEXTS, model=MODEL, dimensions=16)

    assert [item.embedding for item in response.data] == [server.vector_for(text, 16) for text in TEXTS]
    assert server.requests[0].requested_dimensions == 16


def test_single_string_and_token_inputs(server: FakeEmbeddingsServer) -> None:
    with sync_client(server) as client:
        single = client.embeddings.create(input="alpha", model=MODEL)
        tokens = client.embeddings.create(input=[[1, 2, 3], [4]], model=MODEL)

    assert single.data[0].embedding == server.vector_for("alpha", DIMENSIONS)
    assert [item.embedding for item in tokens.data] == [
        server.vector_for_tokens([1, 2, 3], DIMENSIONS),
        server.vector_for_tokens([4], DIMENSIONS),
    ]
    assert tokens.usage.prompt_tokens == 4


def test_empty_string_input_is_a_bad_request(server: FakeEmbeddingsServer) -> None:
    with sync_client(server) as client, pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(input=["alpha", ""], model=MODEL)

    assert caught.value.param == "input"
    assert server.texts_embedded == 0


def test_rate_limit_reaches_the_sdk_with_retry_after(server: FakeEmbeddingsServer) -> None:
    server.script([Fault.rate_limit(retry_after=0.05)])

    async def call() -> None:
        async with async_client(server) as client:
            await client.embeddings.create(input=TEXTS, model=MODEL)

    with pytest.raises(openai.RateLimitError) as caught:
        asyncio.run(call())

    assert caught.value.status_code == 429
    assert caught.value.code == "rate_limit_exceeded"
    assert caught.value.response.headers["retry-after"] == "0.05"
    assert "retry-after-ms" not in caught.value.response.headers
    assert [(record.status, record.fault) for record in server.requests] == [(429, FaultKind.RATE_LIMIT)]
    assert server.texts_embedded == 0


def test_rate_limit_can_omit_retry_after(server: FakeEmbeddingsServer) -> None:
    server.script([Fault.rate_limit()])

    with sync_client(server) as client, pytest.raises(openai.RateLimitError) as caught:
        client.embeddings.create(input="alpha", model=MODEL)

    assert "retry-after" not in caught.value.response.headers


def test_sdk_retries_are_counted_by_the_server(server: FakeEmbeddingsServer) -> None:
    server.script([Fault.rate_limit(retry_after=0.01), Fault.server_error(502, retry_after=0.01), None])

    with sync_client(server, max_retries=2) as client:
        response = client.embeddings.create(input=TEXTS, model=MODEL)

    assert len(response.data) == len(TEXTS)
    records = server.requests
    assert [record.status for record in records] == [429, 502, 200]
    assert [record.sdk_retry_count for record in records] == [0, 1, 2]
    assert server.embedded_texts == {text: 1 for text in TEXTS}


def test_sdk_prefers_retry_after_ms_to_retry_after(server: FakeEmbeddingsServer) -> None:
    server.script([Fault.rate_limit(retry_after=60, retry_after_ms=10)])

    with sync_client(server, max_retries=1) as client:
        client.embeddings.create(input="alpha", model=MODEL)

    first, second = server.requests
    assert second.started - first.finished < 1.0


@pytest.mark.parametrize(
    ("fault", "error_class", "status"),
    [
        (Fault.server_error(), openai.InternalServerError, 500),
        (Fault.bad_request(), openai.BadRequestError, 400),
        (Fault.unauthorized(), openai.AuthenticationError, 401),
    ],
)
def test_error_faults_map_to_sdk_errors(
    server: FakeEmbeddingsServer,
    fault: Fault,
    error_class: type[openai.APIStatusError],
    status: int,
) -> None:
    server.script([fault])

    with sync_client(server) as client, pytest.raises(error_class) as caught:
        client.embeddings.create(input="alpha", model=MODEL)

    assert caught.value.status_code == status
    assert isinstance(caught.value.body, dict) and "message" in caught.value.body
    assert server.requests[0].fault == fault.kind
    assert server.scripted_remaining == 0


def test_timeout_fault_trips_the_client_timeout(server: FakeEmbeddingsServer) -> None:
    server.script([Fault.timeout()])

    async def call() -> None:
        async with async_client(server, timeout=0.2) as client:
            await client.embeddings.create(input=TEXTS, model=MODEL)

    with pytest.raises(openai.APITimeoutError):
        asyncio.run(call())

    assert server.wait_for_in_flight(0, timeout=2.0)
    (record,) = server.requests
    assert record.fault == FaultKind.TIMEOUT
    assert record.status is None
    assert 0.15 < record.duration < 2.0


def test_wrong_dimensions_answer_200_with_short_vectors(server: FakeEmbeddingsServer) -> None:
    server.script([Fault.wrong_dimensions(7)])

    with sync_client(server) as client:
        response = client.embeddings.create(input=TEXTS, model=MODEL)

    assert [len(item.embedding) for item in response.data] == [7, 7, 7]
    assert server.requests[0].status == 200
    assert server.texts_embedded == 0


def test_required_api_key_is_enforced() -> None:
    with FakeEmbeddingsServer(dimensions=8, required_api_key="right-key") as server:
        wrong_key_client = sync_client(server, api_key="wrong-key")
        with wrong_key_client, pytest.raises(openai.AuthenticationError) as caught:
            wrong_key_client.embeddings.create(input="alpha", model=MODEL)
        with sync_client(server, api_key="right-key") as client:
            client.embeddings.create(input="alpha", model=MODEL)

        assert caught.value.code == "invalid_api_key"
        assert [record.status for record in server.requests] == [401, 200]


def test_raw_http_needs_a_bearer_header_and_the_embeddings_path(
    server: FakeEmbeddingsServer,
) -> None:
    content = {"Content-Type": "application/json"}
    bearer = {**content, "Authorization": "Bearer test-key"}

    assert post_raw(server, "/v1/embeddings", content) == 401
    assert post_raw(server, "/v1/embeddings", bearer) == 200
    assert post_raw(server, "/embeddings", bearer) == 200
    assert post_raw(server, "/v1/chat/completions", bearer) == 404


def test_down_answers_503_until_up(server: FakeEmbeddingsServer) -> None:
    server.script([None])
    server.down()

    with sync_client(server) as client:
        with pytest.raises(openai.InternalServerError) as caught:
            client.embeddings.create(input="alpha", model=MODEL)
        assert caught.value.status_code == 503
        assert server.scripted_remaining == 1

        server.up()
        client.embeddings.create(input="alpha", model=MODEL)

    assert [(record.status, record.fault) for record in server.requests] == [
        (503, FaultKind.DOWN),
        (200, None),
    ]


def test_concurrent_requests_overlap(server: FakeEmbeddingsServer) -> None:
    server.latency = 0.2
    batches = [[f"text {batch}-{item}" for item in range(3)] for batch in range(4)]

    async def call_all() -> None:
        async with async_client(server) as client:
            await asyncio.gather(*(client.embeddings.create(input=batch, model=MODEL) for batch in batches))

    asyncio.run(call_all())

    records = server.requests
    assert len(records) == 4
    assert max(record.started for record in records) < min(record.finished for record in records)
    assert all(record.duration >= 0.19 for record in records)
    assert server.max_concurrency >= 2
    first_arrival = min(record.started for record in records)
    last_answer = max(record.finished for record in records)
    assert last_answer - first_arrival < 0.5
    assert server.texts_embedded == 12


def test_counters_count_each_text_answered(server: FakeEmbeddingsServer) -> None:
    embed(server, ["alpha", "beta"])
    embed(server, ["alpha"])
    server.script([Fault.server_error()])
    with pytest.raises(openai.InternalServerError):
        embed(server, ["gamma"])

    assert server.request_count == 3
    assert server.texts_embedded == 3
    assert server.embedded_texts == {"alpha": 2, "beta": 1}
    assert [record.input_count for record in server.requests] == [2, 1, 1]
    assert server.max_concurrency == 1

    server.reset_counters()

    assert server.request_count == 0
    assert server.texts_embedded == 0
    assert server.embedded_texts == {}
    assert server.max_concurrency == 0


def fault_sequence(seed: int, request_count: int) -> list[FaultKind | None]:
    with FakeEmbeddingsServer(dimensions=8) as server:
        server.random_faults(rate=0.5, seed=seed, kinds=("rate_limit", "server_error"), retry_after=0.01)
        with sync_client(server) as client:
            for _ in range(request_count):
                try:
                    client.embeddings.create(input="alpha", model=MODEL)
                except openai.APIStatusError:
                    pass
        return [record.fault for record in server.requests]


def test_random_faults_repeat_for_a_seed() -> None:
    first = fault_sequence(seed=1, request_count=12)

    assert first == fault_sequence(seed=1, request_count=12)
    assert None in first
    assert {FaultKind.RATE_LIMIT, FaultKind.SERVER_ERROR} & set(first)


def test_sdk_retries_through_random_faults(server: FakeEmbeddingsServer) -> None:
    server.random_faults(rate=0.5, seed=3, kinds=("rate_limit", "server_error"), retry_after=0.01)

    for text in TEXTS:
        embed(server, [text], max_retries=10)

    assert server.embedded_texts == {text: 1 for text in TEXTS}
    assert server.request_count == len(TEXTS) + sum(
        1 for record in server.requests if record.fault is not None
    )


def test_script_runs_before_random_faults(server: FakeEmbeddingsServer) -> None:
    server.random_faults(rate=1.0, seed=0, kinds=("server_error",))
    server.script([None])

    embed(server, ["alpha"])
    with pytest.raises(openai.InternalServerError):
        embed(server, ["beta"])
    server.clear_faults()
    embed(server, ["gamma"])

    assert [record.status for record in server.requests] == [200, 500, 200]


def test_stop_returns_promptly_while_a_request_is_held() -> None:
    server = FakeEmbeddingsServer(dimensions=8).start()
    server.script([Fault.timeout()])
    errors: list[BaseException] = []

    def call() -> None:
        try:
            embed(server, ["alpha"])
        except openai.APIError as error:
            errors.append(error)

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    assert server.wait_for_in_flight(1, timeout=5.0)

    stop_started = time.monotonic()
    server.stop()
    stop_seconds = time.monotonic() - stop_started
    caller.join(timeout=5.0)

    assert stop_seconds < 1.0
    assert not caller.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], openai.APIConnectionError)
    assert [(record.status, record.fault) for record in server.requests] == [(None, FaultKind.TIMEOUT)]

"""A loopback stand-in for the OpenAI embeddings API.

`FakeEmbeddingsServer` is a real HTTP server on 127.0.0.1 that the real `openai`
SDK talks to. It answers `POST /v1/embeddings` with deterministic unit vectors,
injects faults on request (429, 5xx, timeouts, wrong dimensions, 400, 401) and
records every request, so tests prove retries by how many requests arrived,
concurrency by overlapping request intervals, and caching by how many texts
were embedded.

Use it as a context manager, or as a pytest plugin (`pytest_plugins =
["tests.fake_openai"]` in the root conftest) for the `fake_embeddings_server`
fixture.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import select
import socket
import socketserver
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Self, cast
from urllib.parse import urlsplit

import numpy as np
import numpy.typing as npt
import pytest

EMBEDDINGS_PATHS = frozenset({"/v1/embeddings", "/embeddings"})
DEFAULT_HOLD_SECONDS = 30.0
"""How long a timeout fault holds a request when the client never gives up."""
MAX_INPUTS_PER_REQUEST = 2048
"""The API's limit on inputs in one request."""
HOLD_POLL_SECONDS = 0.02
STOP_GRACE_SECONDS = 1.0
"""How long `stop()` waits for in-flight requests to record themselves."""
IDLE_CONNECTION_SECONDS = 30.0
TOKEN_INPUT_PREFIX = "\x00tokens:"


class FaultKind(StrEnum):
    RATE_LIMIT = "rate_limit"
    SERVER_ERROR = "server_error"
    TIMEOUT = "timeout"
    WRONG_DIMENSIONS = "wrong_dimensions"
    BAD_REQUEST = "bad_request"
    UNAUTHORIZED = "unauthorized"
    DOWN = "down"
    """Recorded for requests refused while the server is `down()`; not scriptable."""


RANDOM_FAULT_KINDS = frozenset(
    {
        FaultKind.RATE_LIMIT,
        FaultKind.SERVER_ERROR,
        FaultKind.TIMEOUT,
        FaultKind.BAD_REQUEST,
        FaultKind.UNAUTHORIZED,
    }
)


@dataclass(frozen=True, slots=True)
class Fault:
    """One scripted misbehaviour. Build it with the class methods."""

    kind: FaultKind
    status: int
    """The HTTP status answered (a held request gets no answer unless its hold runs out)."""
    retry_after: float | None = None
    """Seconds sent as `Retry-After`; None leaves the header out."""
    retry_after_ms: float | None = None
    """Milliseconds sent as `retry-after-ms`; None leaves the header out."""
    hold_seconds: float = DEFAULT_HOLD_SECONDS
    dimensions: int | None = None
    """The vector length a wrong-dimensions answer uses."""

    @classmethod
    def rate_limit(cls, retry_after: float | None = None, *, retry_after_ms: float | None = None) -> Fault:
        return cls(FaultKind.RATE_LIMIT, 429, retry_after=retry_after, retry_after_ms=retry_after_ms)

    @classmethod
    def server_error(
        cls,
        status: int = 500,
        *,
        retry_after: float | None = None,
        retry_after_ms: float | None = None,
    ) -> Fault:
        if not 500 <= status <= 599:
            raise ValueError(f"a server error needs a 5xx status, got {status}")
        return cls(FaultKind.SERVER_ERROR, status, retry_after=retry_after, retry_after_ms=retry_after_ms)

    @classmethod
    def timeout(cls, hold_seconds: float = DEFAULT_HOLD_SECONDS) -> Fault:
        """Hold the request open until the client hangs up, `stop()`, or `hold_seconds` (then 504)."""
        return cls(FaultKind.TIMEOUT, 504, hold_seconds=hold_seconds)

    @classmethod
    def wrong_dimensions(cls, dimensions: int) -> Fault:
        """Answer 200 with vectors of `dimensions` floats, whatever was asked."""
        return cls(FaultKind.WRONG_DIMENSIONS, 200, dimensions=dimensions)

    @classmethod
    def bad_request(cls) -> Fault:
        return cls(FaultKind.BAD_REQUEST, 400)

    @classmethod
    def unauthorized(cls) -> Fault:
        return cls(FaultKind.UNAUTHORIZED, 401)


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """What the server saw of one request, recorded when it finished."""

    started: float
    """`time.monotonic()` when the request line and headers had arrived."""
    finished: float
    """`time.monotonic()` just before the answer was written, or when the request was abandoned."""
    input_count: int
    """Inputs in the body; 0 when the body could not be parsed."""
    status: int | None
    """The status sent; None when no answer was sent (the client hung up or the server stopped)."""
    fault: FaultKind | None
    inputs: tuple[str, ...] = ()
    """The texts (or token keys, see `token_input_key`) in the body."""
    model: str | None = None
    encoding_format: str | None = None
    """As sent by the client; None when the body left it out."""
    requested_dimensions: int | None = None
    sdk_retry_count: int | None = None
    """The openai SDK's `x-stainless-retry-count` header: 0 on a first try."""

    @property
    def duration(self) -> float:
        return self.finished - self.started

    def overlaps(self, other: RequestRecord) -> bool:
        return self.started < other.finished and other.started < self.finished


@dataclass(frozen=True, slots=True)
class EmbeddingInput:
    key: str
    """The text itself, or `token_input_key(tokens)` for a token-id list."""
    token_count: int


@dataclass(frozen=True, slots=True)
class EmbeddingRequest:
    model: str
    inputs: tuple[EmbeddingInput, ...]
    dimensions: int | None
    encoding_format: str | None


class InvalidEmbeddingRequest(ValueError):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def token_input_key(tokens: Sequence[int]) -> str:
    """The key a token-id input is hashed and counted under."""
    return TOKEN_INPUT_PREFIX + ",".join(str(token) for token in tokens)


def unit_vector(key: str, dimensions: int) -> npt.NDArray[np.float32]:
    """A deterministic little-endian float32 unit vector seeded by sha256(key)."""
    if dimensions < 1:
        raise ValueError(f"dimensions must be at least 1, got {dimensions}")
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
    generator = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    values = generator.standard_normal(dimensions)
    return (values / np.linalg.norm(values)).astype("<f4")


def encode_vector(vector: npt.NDArray[np.float32], encoding_format: str | None) -> list[float] | str:
    """Floats for "float" (the API default), base64 of little-endian float32 for "base64"."""
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return cast(list[float], vector.tolist())


def approximate_token_count(text: str) -> int:
    return max(1, (len(text) + 3) // 4)


def parse_embedding_request(body: bytes) -> EmbeddingRequest:
    try:
        payload: object = json.loads(body)
    except ValueError:
        raise InvalidEmbeddingRequest("We could not parse the JSON body of your request.") from None
    if not isinstance(payload, dict):
        raise InvalidEmbeddingRequest("The request body must be a JSON object.")
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidEmbeddingRequest("You must provide a model parameter.", "model")
    return EmbeddingRequest(
        model=model,
        inputs=parse_inputs(payload.get("input")),
        dimensions=parse_dimensions(payload.get("dimensions")),
        encoding_format=parse_encoding_format(payload.get("encoding_format")),
    )


def parse_inputs(raw: object) -> tuple[EmbeddingInput, ...]:
    if isinstance(raw, str):
        return (text_input(raw),)
    if not isinstance(raw, list) or not raw:
        raise InvalidEmbeddingRequest("'input' must be a non-empty string or array.", "input")
    if len(raw) > MAX_INPUTS_PER_REQUEST:
        raise InvalidEmbeddingRequest(
            f"'input' has {len(raw)} items; at most {MAX_INPUTS_PER_REQUEST} are allowed.", "input"
        )
    if all(isinstance(item, str) for item in raw):
        return tuple(text_input(item) for item in raw)
    if all(is_token_id(item) for item in raw):
        return (token_input(raw),)
    if all(isinstance(item, list) for item in raw):
        return tuple(token_input(item) for item in raw)
    raise InvalidEmbeddingRequest("'input' mixes strings, token ids and token arrays.", "input")


def text_input(text: str) -> EmbeddingInput:
    if not text:
        raise InvalidEmbeddingRequest("'input' cannot contain an empty string.", "input")
    return EmbeddingInput(text, approximate_token_count(text))


def is_token_id(item: object) -> bool:
    return isinstance(item, int) and not isinstance(item, bool) and item >= 0


def token_input(tokens: list[object]) -> EmbeddingInput:
    if not tokens or not all(is_token_id(token) for token in tokens):
        raise InvalidEmbeddingRequest("A token array must hold non-negative integers.", "input")
    token_ids = cast(list[int], tokens)
    return EmbeddingInput(token_input_key(token_ids), len(token_ids))


def parse_dimensions(raw: object) -> int | None:
    if raw is None:
        return None
    if not isinstance(raw, int) or isinstance(raw, bool) or raw < 1:
        raise InvalidEmbeddingRequest("'dimensions' must be a positive integer.", "dimensions")
    return raw


def parse_encoding_format(raw: object) -> str | None:
    if raw is None or raw in ("float", "base64"):
        return raw
    raise InvalidEmbeddingRequest("'encoding_format' must be 'float' or 'base64'.", "encoding_format")


def openai_error(
    message: str, error_type: str, code: str | None = None, param: str | None = None
) -> dict[str, object]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def format_seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def fault_headers(fault: Fault) -> dict[str, str]:
    headers: dict[str, str] = {}
    if fault.retry_after is not None:
        headers["Retry-After"] = format_seconds(fault.retry_after)
    if fault.retry_after_ms is not None:
        headers["retry-after-ms"] = format_seconds(fault.retry_after_ms)
    return headers


def fault_error_body(fault: Fault) -> dict[str, object]:
    match fault.kind:
        case FaultKind.RATE_LIMIT:
            return openai_error(
                "Rate limit reached for requests (fake server).", "requests", "rate_limit_exceeded"
            )
        case FaultKind.TIMEOUT:
            return openai_error("The request timed out (fake server).", "timeout")
        case FaultKind.BAD_REQUEST:
            return openai_error("Invalid request (scripted by the fake server).", "invalid_request_error")
        case FaultKind.UNAUTHORIZED:
            return openai_error(
                "Incorrect API key provided (scripted by the fake server).",
                "invalid_request_error",
                "invalid_api_key",
            )
        case _:
            return openai_error(
                "The server had an error while processing your request (fake server).",
                "server_error",
            )


@dataclass(slots=True)
class _RandomFaultPlan:
    rate: float
    generator: random.Random
    kinds: tuple[FaultKind, ...]
    retry_after: float | None
    hold_seconds: float

    def draw(self) -> Fault | None:
        if self.generator.random() >= self.rate:
            return None
        match self.generator.choice(self.kinds):
            case FaultKind.RATE_LIMIT:
                return Fault.rate_limit(self.retry_after)
            case FaultKind.SERVER_ERROR:
                return Fault.server_error(500, retry_after=self.retry_after)
            case FaultKind.TIMEOUT:
                return Fault.timeout(self.hold_seconds)
            case FaultKind.BAD_REQUEST:
                return Fault.bad_request()
            case _:
                return Fault.unauthorized()


@dataclass(slots=True)
class _Accounts:
    records: list[RequestRecord] = field(default_factory=list)
    embedded_texts: Counter[str] = field(default_factory=Counter)
    max_concurrency: int = 0


class _ServerState:
    """Everything the handler threads share. Every mutable field is guarded by `_lock`."""

    def __init__(self, dimensions: int, latency: float, required_api_key: str | None) -> None:
        self.dimensions = dimensions
        self.required_api_key = required_api_key
        self.latency = latency
        self.released = threading.Event()
        """Set by `stop()`: held and sleeping requests return at once."""
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._script: deque[Fault | None] = deque()
        self._random_faults: _RandomFaultPlan | None = None
        self._is_down = False
        self._in_flight = 0
        self._accounts = _Accounts()
        self._connections: set[socket.socket] = set()

    # Fault control.
    def add_script(self, faults: Iterable[Fault | None]) -> None:
        with self._lock:
            self._script.extend(faults)

    def set_random_faults(self, plan: _RandomFaultPlan | None) -> None:
        with self._lock:
            self._random_faults = plan

    def clear_faults(self) -> None:
        with self._lock:
            self._script.clear()
            self._random_faults = None

    def scripted_remaining(self) -> int:
        with self._lock:
            return len(self._script)

    def set_down(self, is_down: bool) -> None:
        with self._lock:
            self._is_down = is_down

    def is_down(self) -> bool:
        with self._lock:
            return self._is_down

    def next_fault(self) -> Fault | None:
        with self._lock:
            if self._script:
                return self._script.popleft()
            if self._random_faults is not None:
                return self._random_faults.draw()
            return None

    # Request lifecycle.
    def begin_request(self) -> float:
        with self._changed:
            self._in_flight += 1
            accounts = self._accounts
            accounts.max_concurrency = max(accounts.max_concurrency, self._in_flight)
            self._changed.notify_all()
        return time.monotonic()

    def finish_request(self, record: RequestRecord) -> None:
        with self._changed:
            self._in_flight -= 1
            self._accounts.records.append(record)
            if record.status == 200 and record.fault is None:
                self._accounts.embedded_texts.update(record.inputs)
            self._changed.notify_all()

    def wait_for_in_flight(self, count: int, timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self._in_flight == count, timeout)

    # Accounting.
    def snapshot(self) -> _Accounts:
        with self._lock:
            accounts = self._accounts
            return _Accounts(
                list(accounts.records), Counter(accounts.embedded_texts), accounts.max_concurrency
            )

    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    def reset_accounts(self) -> None:
        with self._lock:
            self._accounts = _Accounts(max_concurrency=self._in_flight)

    # Connections, so that `stop()` can cut keep-alive and held ones.
    def track_connection(self, connection: socket.socket) -> None:
        with self._lock:
            self._connections.add(connection)

    def forget_connection(self, connection: socket.socket) -> None:
        with self._lock:
            self._connections.discard(connection)

    def shut_connections(self) -> None:
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@dataclass(slots=True)
class _Outcome:
    """Filled in while a request is answered, turned into a `RequestRecord` once."""

    started: float
    sdk_retry_count: int | None
    status: int | None = None
    fault: FaultKind | None = None
    request: EmbeddingRequest | None = None
    recorded: bool = False

    def to_record(self) -> RequestRecord:
        request = self.request
        return RequestRecord(
            started=self.started,
            finished=time.monotonic(),
            input_count=len(request.inputs) if request else 0,
            status=self.status,
            fault=self.fault,
            inputs=tuple(item.key for item in request.inputs) if request else (),
            model=request.model if request else None,
            encoding_format=request.encoding_format if request else None,
            requested_dimensions=request.dimensions if request else None,
            sdk_retry_count=self.sdk_retry_count,
        )


class _EmbeddingsHandler(BaseHTTPRequestHandler):
    """Answers one connection's requests. Each POST is recorded just before its
    answer is written, so a client that has its answer always finds it counted."""

    protocol_version = "HTTP/1.1"
    timeout = IDLE_CONNECTION_SECONDS
    server_version = "FakeOpenAI/1.0"
    outcome: _Outcome | None = None

    @property
    def state(self) -> _ServerState:
        return cast(_LoopbackHTTPServer, self.server).state

    def setup(self) -> None:
        super().setup()
        self.state.track_connection(self.connection)

    def finish(self) -> None:
        self.state.forget_connection(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    def log_message(self, format: str, *args: object) -> None:
        return None

    def do_GET(self) -> None:
        self.outcome = None
        self.send_json(404, openai_error("Not found on the fake server.", "invalid_request_error"))

    def do_POST(self) -> None:
        started = self.state.begin_request()
        retry_count = parse_optional_int(self.headers.get("x-stainless-retry-count"))
        self.outcome = outcome = _Outcome(started, retry_count)
        try:
            self.answer_post(outcome)
        finally:
            self.record(outcome)

    def record(self, outcome: _Outcome) -> None:
        if not outcome.recorded:
            outcome.recorded = True
            self.state.finish_request(outcome.to_record())

    def answer_post(self, outcome: _Outcome) -> None:
        body = self.read_body()
        request_or_error: EmbeddingRequest | InvalidEmbeddingRequest
        try:
            request_or_error = outcome.request = parse_embedding_request(body)
        except InvalidEmbeddingRequest as error:
            request_or_error = error

        if urlsplit(self.path).path.rstrip("/") not in EMBEDDINGS_PATHS:
            message = f"Unknown path {self.path}."
            self.send_json(404, openai_error(message, "invalid_request_error"))
        elif self.state.is_down():
            outcome.fault = FaultKind.DOWN
            self.send_json(503, openai_error("The service is down (fake server).", "server_error"))
        elif (auth_error := self.authorization_error()) is not None:
            self.send_json(401, auth_error)
        elif (fault := self.state.next_fault()) is not None:
            outcome.fault = fault.kind
            self.answer_fault(fault, request_or_error)
        elif isinstance(request_or_error, InvalidEmbeddingRequest):
            self.send_invalid_request(request_or_error)
        else:
            self.wait_unless_stopped(self.state.latency)
            dimensions = request_or_error.dimensions or self.state.dimensions
            self.send_embeddings(request_or_error, dimensions)

    def answer_fault(
        self, fault: Fault, request_or_error: EmbeddingRequest | InvalidEmbeddingRequest
    ) -> None:
        if fault.kind is FaultKind.TIMEOUT:
            if self.hold_while_client_waits(fault.hold_seconds):
                self.send_json(fault.status, fault_error_body(fault))
            else:
                self.close_connection = True
        elif fault.kind is FaultKind.WRONG_DIMENSIONS:
            if isinstance(request_or_error, InvalidEmbeddingRequest):
                self.send_invalid_request(request_or_error)
            else:
                self.wait_unless_stopped(self.state.latency)
                wrong_dimensions = fault.dimensions or self.state.dimensions + 1
                self.send_embeddings(request_or_error, wrong_dimensions)
        else:
            self.send_json(fault.status, fault_error_body(fault), fault_headers(fault))

    def authorization_error(self) -> dict[str, object] | None:
        authorization = self.headers.get("Authorization", "")
        api_key = authorization.removeprefix("Bearer ")
        if api_key == authorization or not api_key.strip():
            return openai_error(
                "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.",
                "invalid_request_error",
            )
        required = self.state.required_api_key
        if required is not None and api_key != required:
            return openai_error("Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
        return None

    def read_body(self) -> bytes:
        length = parse_optional_int(self.headers.get("Content-Length")) or 0
        return self.rfile.read(length) if length > 0 else b""

    def send_invalid_request(self, error: InvalidEmbeddingRequest) -> None:
        self.send_json(400, openai_error(error.message, "invalid_request_error", param=error.param))

    def send_embeddings(self, request: EmbeddingRequest, dimensions: int) -> None:
        data = [
            {
                "object": "embedding",
                "index": index,
                "embedding": encode_vector(unit_vector(item.key, dimensions), request.encoding_format),
            }
            for index, item in enumerate(request.inputs)
        ]
        token_total = sum(item.token_count for item in request.inputs)
        body = {
            "object": "list",
            "data": data,
            "model": request.model,
            "usage": {"prompt_tokens": token_total, "total_tokens": token_total},
        }
        self.send_json(200, body)

    def send_json(self, status: int, body: object, headers: Mapping[str, str] | None = None) -> None:
        """Record the request, then write one JSON answer unless the client has hung up."""
        encoded = json.dumps(body).encode("utf-8")
        outcome = self.outcome
        if self.client_hung_up():
            self.close_connection = True
            return
        if outcome is not None:
            outcome.status = status
            self.record(outcome)
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(encoded)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(encoded)
            self.wfile.flush()
        except OSError:
            self.close_connection = True

    def wait_unless_stopped(self, seconds: float) -> None:
        if seconds > 0:
            self.state.released.wait(seconds)

    def hold_while_client_waits(self, seconds: float) -> bool:
        """Hold the request; True if the hold ran out with the client still waiting."""
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            if self.state.released.wait(min(remaining, HOLD_POLL_SECONDS)):
                return False
            if self.client_hung_up():
                return False
        return True

    def client_hung_up(self) -> bool:
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True


def parse_optional_int(raw: str | None) -> int | None:
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None


class _LoopbackHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 128

    def __init__(self, state: _ServerState) -> None:
        self.state = state
        super().__init__(("127.0.0.1", 0), _EmbeddingsHandler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host name, which can stall without a network.
        socketserver.TCPServer.server_bind(self)
        self.server_name = "127.0.0.1"
        self.server_port = self.server_address[1]


class FakeEmbeddingsServer:
    """An OpenAI-compatible embeddings endpoint on 127.0.0.1, with faults and counters.

    The port is bound at construction; `start()` (or `with`) serves it from a
    daemon thread and `stop()` releases held requests, cuts open connections
    and closes the socket. A stopped server cannot be started again.
    """

    def __init__(
        self,
        dimensions: int = 64,
        latency: float = 0.0,
        *,
        required_api_key: str | None = None,
    ) -> None:
        if dimensions < 1:
            raise ValueError(f"dimensions must be at least 1, got {dimensions}")
        self._state = _ServerState(dimensions, 0.0, required_api_key)
        self.latency = latency
        self._http = _LoopbackHTTPServer(self._state)
        self._thread: threading.Thread | None = None
        self._stopped = False

    # Lifecycle.
    @property
    def port(self) -> int:
        return self._http.server_port

    @property
    def base_url(self) -> str:
        """Pass to `OpenAI(base_url=...)` / `AsyncOpenAI(base_url=...)`."""
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> Self:
        if self._stopped:
            raise RuntimeError("a stopped FakeEmbeddingsServer cannot be started again")
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._http.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"fake-openai-{self.port}",
                daemon=True,
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Release held requests, stop serving and close every connection. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self._state.released.set()
        if self._thread is not None:
            self._http.shutdown()
            self._state.wait_for_in_flight(0, STOP_GRACE_SECONDS)
        self._state.shut_connections()
        self._http.server_close()
        if self._thread is not None:
            self._thread.join(STOP_GRACE_SECONDS)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # Behaviour.
    @property
    def dimensions(self) -> int:
        """The vector length answered when a request does not ask for `dimensions`."""
        return self._state.dimensions

    @property
    def latency(self) -> float:
        """Seconds added before every 200 answer; may be changed while serving."""
        return self._state.latency

    @latency.setter
    def latency(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"latency cannot be negative, got {seconds}")
        self._state.latency = seconds

    @property
    def required_api_key(self) -> str | None:
        return self._state.required_api_key

    @required_api_key.setter
    def required_api_key(self, api_key: str | None) -> None:
        self._state.required_api_key = api_key

    def script(self, faults: Iterable[Fault | None]) -> None:
        """Queue faults (None answers normally), one per request in arrival order.

        Requests refused while down or for a missing or wrong key take no entry.
        Calls append to what is still queued.
        """
        self._state.add_script(faults)

    @property
    def scripted_remaining(self) -> int:
        return self._state.scripted_remaining()

    def random_faults(
        self,
        rate: float,
        seed: int,
        kinds: Iterable[FaultKind | str] = ("rate_limit", "server_error", "timeout"),
        *,
        retry_after: float | None = None,
        hold_seconds: float = DEFAULT_HOLD_SECONDS,
    ) -> None:
        """Fail a seeded random share of requests once the script is empty.

        `retry_after` goes on 429 and 500 answers; `hold_seconds` bounds timeouts.
        """
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"rate must lie in [0, 1], got {rate}")
        chosen = tuple(FaultKind(kind) for kind in kinds)
        unsupported = sorted(set(chosen) - RANDOM_FAULT_KINDS)
        if not chosen or unsupported:
            raise ValueError(f"random faults need kinds from {sorted(RANDOM_FAULT_KINDS)}")
        plan = _RandomFaultPlan(rate, random.Random(seed), chosen, retry_after, hold_seconds)
        self._state.set_random_faults(plan)

    def clear_faults(self) -> None:
        """Drop the script and the random mode (not `down()`)."""
        self._state.clear_faults()

    def down(self) -> None:
        """Answer every request with 503 until `up()`."""
        self._state.set_down(True)

    def up(self) -> None:
        self._state.set_down(False)

    # Accounting.
    @property
    def requests(self) -> list[RequestRecord]:
        """Finished requests, in the order they finished."""
        return self._state.snapshot().records

    @property
    def request_count(self) -> int:
        return len(self.requests)

    @property
    def texts_embedded(self) -> int:
        """Inputs answered with 200 and the right vector length."""
        return self.embedded_texts.total()

    @property
    def embedded_texts(self) -> Counter[str]:
        """How many times each input was answered successfully."""
        return self._state.snapshot().embedded_texts

    @property
    def max_concurrency(self) -> int:
        """The most requests in flight at once since start or `reset_counters()`."""
        return self._state.snapshot().max_concurrency

    @property
    def in_flight(self) -> int:
        return self._state.in_flight()

    def wait_for_in_flight(self, count: int, timeout: float = 5.0) -> bool:
        """Block until exactly `count` requests are in flight; False on timeout."""
        return self._state.wait_for_in_flight(count, timeout)

    def reset_counters(self) -> None:
        """Forget recorded requests and embedded texts; faults and `down()` stay."""
        self._state.reset_accounts()

    # Expected vectors.
    @staticmethod
    def vector_for(text: str, dimensions: int) -> list[float]:
        """The vector the server answers for `text`, exactly as the SDK decodes it."""
        return cast(list[float], unit_vector(text, dimensions).tolist())

    @staticmethod
    def vector_for_tokens(tokens: Sequence[int], dimensions: int) -> list[float]:
        return FakeEmbeddingsServer.vector_for(token_input_key(tokens), dimensions)


@pytest.fixture
def fake_embeddings_server() -> Iterator[FakeEmbeddingsServer]:
    """A running server with the defaults; register with `pytest_plugins`."""
    with FakeEmbeddingsServer() as server:
        yield server

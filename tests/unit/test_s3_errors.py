"""How a failed S3 GET is classified: real obstore requests against a fake S3 server on loopback
that answers each request with the status and S3 error body a test asks for.

Every status/code pair :func:`inference_service.adapters.s3.classify` handles is in the table;
each row says what ``S3FrameStore.get`` raises: a final per-task error (an error result and a
dead letter) or a transient one (consumption pauses and the frame is tried again).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from inference_service.adapters.s3 import (
    CLOCK_ERRORS,
    CREDENTIAL_ERRORS,
    LOCATION_ERRORS,
    MAX_CACHED_BUCKETS,
    NOT_FOUND_ERRORS,
    REGION_ERRORS,
    TRANSIENT_ERRORS,
    S3Failure,
    S3FrameStore,
    Verdict,
    classify,
)
from inference_service.errors import (
    ErrorCode,
    FrameForbiddenError,
    FrameNotFoundError,
    FrameTooLargeError,
    InferenceError,
    InvalidTaskError,
    StoreUnavailableError,
    TaskError,
)
from inference_service.settings import Settings

pytestmark = pytest.mark.timeout(60)


@dataclass
class Answer:
    """What the fake server answers to every request."""

    status: int = 200
    code: str | None = None
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def error_body(code: str) -> bytes:
    """An S3 error document, as AWS and SeaweedFS send it."""
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>the server's words for {code}</Message>"
        "<Resource>/frames/k.jpg</Resource><RequestId>1</RequestId></Error>"
    ).encode()


Check = Callable[[S3FrameStore, Answer], Awaitable[None]]


def with_server(check: Check, monkeypatch: pytest.MonkeyPatch, **settings: Any) -> None:
    """Run ``check`` with a store on a fake S3 server; ``check`` sets the :class:`Answer`."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    answer = Answer()

    async def handler(_request: web.Request) -> web.StreamResponse:
        if answer.status == 200:
            return web.Response(body=answer.body, content_type="image/jpeg")
        body = error_body(answer.code) if answer.code else b""
        return web.Response(
            status=answer.status,
            body=body,
            content_type="application/xml",
            headers=answer.headers,
        )

    async def go() -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        async with TestServer(app, host="127.0.0.1") as server:
            given = Settings(s3_endpoint_url=f"http://127.0.0.1:{server.port}", **settings)
            await check(S3FrameStore(given, max_retries=0), answer)

    asyncio.run(go())


def raised(store_check: Callable[[], Awaitable[bytes]]) -> Callable[[], Awaitable[BaseException]]:
    async def run() -> BaseException:
        try:
            await store_check()
        except InferenceError as exc:
            return exc
        raise AssertionError("the GET succeeded")

    return run


# --- the table ---------------------------------------------------------------------------------

FINAL = "final"
PAUSE = "pause"

TABLE: list[tuple[int, str | None, type[InferenceError], str]] = [
    # Not found: frame_not_found.
    (404, "NoSuchKey", FrameNotFoundError, FINAL),
    (404, "NoSuchBucket", FrameNotFoundError, FINAL),
    (404, None, FrameNotFoundError, FINAL),
    # Refused to these credentials (AWS: also a missing key without s3:ListBucket): forbidden.
    (403, "AccessDenied", FrameForbiddenError, FINAL),
    (403, "AllAccessDisabled", FrameForbiddenError, FINAL),
    (403, "AllAccountsDisabled", FrameForbiddenError, FINAL),
    (403, "AccountProblem", FrameForbiddenError, FINAL),
    (403, "InvalidObjectState", FrameForbiddenError, FINAL),  # archived (Glacier)
    (403, None, FrameForbiddenError, FINAL),
    # In another region than requests are signed for: forbidden (from here).
    (301, "PermanentRedirect", FrameForbiddenError, FINAL),
    (307, "TemporaryRedirect", FrameForbiddenError, FINAL),  # no Location: obstore keeps none
    (400, "AuthorizationHeaderMalformed", FrameForbiddenError, FINAL),
    (400, "IllegalLocationConstraintException", FrameForbiddenError, FINAL),
    # A bucket name or key the server calls invalid: invalid_task.
    (400, "InvalidBucketName", InvalidTaskError, FINAL),
    (400, "KeyTooLongError", InvalidTaskError, FINAL),
    (400, "InvalidURI", InvalidTaskError, FINAL),
    # Any other 4xx is final too: forbidden.
    (400, "InvalidRequest", FrameForbiddenError, FINAL),
    (400, "InvalidArgument", FrameForbiddenError, FINAL),
    (400, None, FrameForbiddenError, FINAL),
    (405, "MethodNotAllowed", FrameForbiddenError, FINAL),
    (412, "PreconditionFailed", FrameForbiddenError, FINAL),
    (416, "InvalidRange", FrameForbiddenError, FINAL),
    # The whole service's problem, not the task's: pause (and log an error naming the fix).
    (403, "InvalidAccessKeyId", StoreUnavailableError, PAUSE),
    (403, "SignatureDoesNotMatch", StoreUnavailableError, PAUSE),
    (400, "ExpiredToken", StoreUnavailableError, PAUSE),
    (400, "InvalidToken", StoreUnavailableError, PAUSE),
    (400, "TokenRefreshRequired", StoreUnavailableError, PAUSE),
    (401, "Unauthorized", StoreUnavailableError, PAUSE),
    (401, None, StoreUnavailableError, PAUSE),
    (403, "RequestTimeTooSkewed", StoreUnavailableError, PAUSE),
    # Transient: throttling, timeouts, conflicts, 5xx.
    (400, "RequestTimeout", StoreUnavailableError, PAUSE),
    (408, "RequestTimeout", StoreUnavailableError, PAUSE),
    (409, "OperationAborted", StoreUnavailableError, PAUSE),
    (429, "SlowDown", StoreUnavailableError, PAUSE),
    (429, None, StoreUnavailableError, PAUSE),
    (500, "InternalError", StoreUnavailableError, PAUSE),
    (501, "NotImplemented", StoreUnavailableError, PAUSE),
    (502, None, StoreUnavailableError, PAUSE),
    (503, "SlowDown", StoreUnavailableError, PAUSE),
    (503, "ServiceUnavailable", StoreUnavailableError, PAUSE),
    (504, None, StoreUnavailableError, PAUSE),
]


@pytest.mark.parametrize(("status", "code", "error", "kind"), TABLE)
def test_each_s3_error_response_is_classified(
    monkeypatch: pytest.MonkeyPatch,
    status: int,
    code: str | None,
    error: type[InferenceError],
    kind: str,
) -> None:
    async def check(store: S3FrameStore, answer: Answer) -> None:
        answer.status, answer.code = status, code
        exc = await raised(lambda: store.get("frames", "cam/000001.jpg"))()
        assert type(exc) is error, f"{status} {code}: {type(exc).__name__}: {exc}"
        assert exc.retriable is (kind == PAUSE) and exc.poison is (kind == FINAL)
        assert "s3://frames/cam/000001.jpg" in str(exc)
        if isinstance(exc, TaskError) and not isinstance(exc, FrameNotFoundError):
            # The message says what the server answered (the status, and the code if any).
            said = "a redirect" if status in (301, 307) else str(status)
            assert said in exc.message and (code is None or status in (301, 307)
                                             or code in exc.message), exc.message  # fmt: skip
            assert "the server's words" not in exc.message  # S3's own text stays out

    with_server(check, monkeypatch)


def test_the_table_covers_every_code_the_classifier_names() -> None:
    named = {
        *CREDENTIAL_ERRORS, *CLOCK_ERRORS, *REGION_ERRORS, *LOCATION_ERRORS,
        *TRANSIENT_ERRORS, *NOT_FOUND_ERRORS,
    }  # fmt: skip
    assert named <= {code for _status, code, _error, _kind in TABLE}


def test_frame_forbidden_is_its_own_code() -> None:
    assert FrameForbiddenError("x").code is ErrorCode.FRAME_FORBIDDEN
    assert ErrorCode.FRAME_FORBIDDEN.value == "frame_forbidden"


@pytest.mark.parametrize(
    ("failure", "verdict"),
    [
        (S3Failure(None), Verdict.TRANSIENT),  # no answer: refused connection, timeout, DNS
        (S3Failure(None, redirect=True), Verdict.WRONG_REGION),
        (S3Failure(304), Verdict.TRANSIENT),  # not a refusal: never final
        (S3Failure(302), Verdict.TRANSIENT),
        (S3Failure(301), Verdict.WRONG_REGION),
        (S3Failure(403, "InvalidAccessKeyId"), Verdict.CREDENTIALS),
        (S3Failure(403, "RequestTimeTooSkewed"), Verdict.CLOCK),
        (S3Failure(418), Verdict.FORBIDDEN),  # an unknown 4xx is final
        (S3Failure(599), Verdict.TRANSIENT),
    ],
)
def test_classify_without_a_server(failure: S3Failure, verdict: Verdict) -> None:
    assert classify(failure) is verdict


def test_no_answer_is_transient(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")

    # A port nothing listens on (the fake server's, once closed).
    async def go() -> None:
        app = web.Application()
        async with TestServer(app, host="127.0.0.1") as server:
            port = server.port
        store = S3FrameStore(Settings(s3_endpoint_url=f"http://127.0.0.1:{port}"), max_retries=0)
        exc = await raised(lambda: store.get("frames", "k.jpg"))()
        assert type(exc) is StoreUnavailableError and exc.retriable, exc
        assert "no answer" in str(exc)

    asyncio.run(go())


def test_refused_credentials_pause_and_log_an_error_naming_the_variables(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def check(store: S3FrameStore, answer: Answer) -> None:
        answer.status, answer.code = 403, "InvalidAccessKeyId"
        for _ in range(3):  # a paused task retries: the error is logged once a minute, not each
            exc = await raised(lambda: store.get("frames", "k.jpg"))()
            assert type(exc) is StoreUnavailableError
            assert "AWS_ACCESS_KEY_ID" in str(exc) and "AWS_SECRET_ACCESS_KEY" in str(exc)

    with caplog.at_level(logging.ERROR, logger="inference_service.adapters.s3"):
        with_server(check, monkeypatch)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1, errors
    text = errors[0].getMessage()
    assert "AWS_ACCESS_KEY_ID" in text and "AWS_SECRET_ACCESS_KEY" in text, text
    assert "test-secret" not in text


def test_wrong_region_names_the_region_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    async def check(store: S3FrameStore, answer: Answer) -> None:
        answer.status, answer.code = 400, "AuthorizationHeaderMalformed"
        exc = await raised(lambda: store.get("eu-frames", "k.jpg"))()
        assert isinstance(exc, FrameForbiddenError)
        assert "INFERENCE_S3_REGION=us-east-1" in exc.message and "'eu-frames'" in exc.message

    with_server(check, monkeypatch, s3_region="us-east-1")


def test_ok_and_too_large_say_sizes_against_the_limit_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def check(store: S3FrameStore, answer: Answer) -> None:
        answer.body = b"\xff\xd8\xff" + b"s" * 2000
        assert await store.get("frames", "k.jpg") == answer.body
        answer.body = b"\xff\xd8\xffSECRET" + b"s" * 5000
        exc = await raised(lambda: store.get("frames", "big.jpg"))()
        assert isinstance(exc, FrameTooLargeError)
        assert "INFERENCE_MAX_FRAME_BYTES" in exc.message and "4096" in exc.message
        assert "SECRET" not in exc.message

    with_server(check, monkeypatch, max_frame_bytes=4096)


def test_the_per_bucket_clients_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    async def check(store: S3FrameStore, answer: Answer) -> None:
        answer.body = b"frame"
        buckets = [f"bucket-{i:02d}" for i in range(MAX_CACHED_BUCKETS + 4)]
        for bucket in buckets:
            assert await store.get(bucket, "k.jpg") == b"frame"
            assert await store.get("bucket-00", "k.jpg") == b"frame"  # kept: used every time
        cached = list(store._stores)
        assert len(cached) == MAX_CACHED_BUCKETS
        assert "bucket-00" in cached and buckets[-1] in cached and "bucket-01" not in cached

    with_server(check, monkeypatch)

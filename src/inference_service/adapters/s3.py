"""Frames from S3 (or any S3-compatible server) through obstore: pooled connections, async GETs.

One ``S3Store`` per bucket, made on first use and kept (the last :data:`MAX_CACHED_BUCKETS` used).
A failed GET is read into an :class:`S3Failure` (HTTP status, S3 error code) and classified by
:func:`classify`; the table is in docs/operations.md (section 3, Result) and, in short:

- final for the task (an error result and a dead letter): no such object or bucket
  (``frame_not_found``); access refused, the bucket in another region, any other 4xx
  (``frame_forbidden``); a bucket name or key the server calls invalid (``invalid_task``); an
  object over the byte limit (``frame_too_large``);
- transient (consumption pauses, the frame is tried again): no answer (refused connection,
  timeout), 5xx, throttling (429, 503 SlowDown), 408/409 and ``RequestTimeout``; and the refusals
  that concern the whole service, not the task: credentials refused (:data:`CREDENTIAL_ERRORS`)
  and a skewed clock, logged as errors naming what to fix.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum
from typing import TYPE_CHECKING

import obstore
from obstore.exceptions import (
    InvalidPathError,
    NotFoundError,
    PermissionDeniedError,
    UnauthenticatedError,
)
from obstore.store import S3Store

from inference_service.errors import (
    ConfigError,
    FrameForbiddenError,
    FrameNotFoundError,
    FrameTooLargeError,
    InferenceError,
    InvalidTaskError,
    StoreUnavailableError,
)
from inference_service.ports import Admit
from inference_service.settings import env_name

if TYPE_CHECKING:
    from obstore.store import ClientConfig, RetryConfig

    from inference_service.settings import Settings

log = logging.getLogger(__name__)

MAX_CACHED_BUCKETS = 16
"""Most per-bucket clients kept; the least recently used is dropped past it (a task may name any
bucket when ``INFERENCE_S3_ALLOWED_BUCKETS=*``)."""
SERVICE_ERROR_LOG_EVERY_S = 60.0
"""How often a refusal that concerns the whole service (credentials, clock) is logged again while
it lasts (every retry of every paused task would repeat it)."""


def open_store(
    settings: Settings,
    bucket: str,
    *,
    timeout_s: float = 30.0,
    max_retries: int = 2,
    retry_timeout_s: float = 10.0,
) -> S3Store:
    """An obstore store for ``bucket``: endpoint and region from the settings, credentials from
    ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN`` when set (else obstore's
    own chain: instance profile, web identity, ...), path-style addressing, pooled connections."""
    client: ClientConfig = {
        "allow_http": True,
        "connect_timeout": timedelta(seconds=3),
        "timeout": timedelta(seconds=timeout_s),
        "pool_max_idle_per_host": "64",
    }
    retry: RetryConfig = {
        "max_retries": max_retries,
        "retry_timeout": timedelta(seconds=retry_timeout_s),
    }
    kwargs = settings.s3_store_options()
    return S3Store(
        bucket,
        client_options=client,
        retry_config=retry,
        virtual_hosted_style_request=False,
        **kwargs,  # type: ignore[arg-type]
    )


# --- what a failed request says ------------------------------------------------------------------

CREDENTIAL_ERRORS = (
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
)
"""S3 error codes that say the credentials themselves are wrong (not a missing permission)."""
CLOCK_ERRORS = ("RequestTimeTooSkewed",)
"""S3 error codes that say the host's clock is off (signatures are valid for 15 minutes)."""
REGION_ERRORS = (
    "PermanentRedirect",
    "AuthorizationHeaderMalformed",
    "IllegalLocationConstraintException",
)
"""S3 error codes that say the bucket is in another region than the one requests are signed for."""
LOCATION_ERRORS = ("InvalidBucketName", "KeyTooLongError", "InvalidURI")
"""S3 error codes that say the task's bucket name or key is not one the server takes."""
NOT_FOUND_ERRORS = ("NoSuchKey", "NoSuchBucket")
"""S3 error codes that say the object or its bucket does not exist."""
TRANSIENT_ERRORS = (
    "RequestTimeout",
    "SlowDown",
    "OperationAborted",
    "InternalError",
    "ServiceUnavailable",
)
"""S3 error codes that say "try again", whatever their status (AWS's RequestTimeout is a 400)."""
TRANSIENT_STATUSES = frozenset({408, 409, 429})
"""4xx statuses that are not final: request timeout, a conflicting operation, throttling."""

_STATUS = re.compile(r"status code: (\d{3})\b")
_CODE = re.compile(r"<Code>([^<]{1,64})</Code>")
_REDIRECT = "Received redirect without LOCATION"
"""obstore's text for a 3xx without a Location header: S3's answer to a wrong region (301
PermanentRedirect, 307 TemporaryRedirect), whose status obstore does not keep."""


@dataclass(frozen=True, slots=True)
class S3Failure:
    """What a failed S3 request said, as far as obstore's exception tells it."""

    status: int | None
    """The HTTP status; None when no response came (refused connection, timeout, DNS)."""
    code: str | None = None
    """The ``<Code>`` of the S3 error body (``AccessDenied``, ``NoSuchKey``, ...), if any."""
    redirect: bool = False
    """The server redirected without a Location (a bucket in another region)."""

    @classmethod
    def of(cls, exc: BaseException) -> S3Failure:
        """Read an obstore exception: status and code from its message (obstore keeps the
        response's status line and body there), the class where the message has no status."""
        message = str(exc)
        found = _STATUS.search(message)
        status = int(found[1]) if found else None
        if status is None:
            if isinstance(exc, FileNotFoundError | NotFoundError):
                status = 404
            elif isinstance(exc, PermissionDeniedError):
                status = 403
            elif isinstance(exc, UnauthenticatedError):
                status = 401
        code = _CODE.search(message)
        return cls(status, code[1] if code else None, redirect=_REDIRECT in message)

    def describe(self) -> str:
        """``403 AccessDenied``, ``a redirect``, ``no answer``: for messages."""
        if self.redirect:
            return "a redirect without Location"
        if self.status is None:
            return "no answer"
        return f"{self.status} {self.code}" if self.code else str(self.status)


class Verdict(StrEnum):
    """What a failed GET means for the task and the service."""

    NOT_FOUND = "not_found"
    """No such object or bucket: ``frame_not_found``."""
    FORBIDDEN = "forbidden"
    """The server refuses this frame to these credentials: ``frame_forbidden``."""
    WRONG_REGION = "wrong_region"
    """The bucket is in another region than ``INFERENCE_S3_REGION``: ``frame_forbidden``."""
    BAD_LOCATION = "bad_location"
    """The server calls the bucket name or key invalid: ``invalid_task``."""
    CREDENTIALS = "credentials"
    """The credentials themselves are refused: the service's problem; transient, logged."""
    CLOCK = "clock"
    """The host's clock is off: the service's problem; transient, logged."""
    TRANSIENT = "transient"
    """No answer, 5xx, throttling, a timeout: tried again."""


def classify(failure: S3Failure) -> Verdict:
    """The verdict on a failed GET: the S3 code first (it is more precise than the status), then
    the status; anything unknown without a 4xx status is transient (a task is never lost for an
    error nobody has seen)."""
    code, status = failure.code, failure.status
    if code in CREDENTIAL_ERRORS:
        return Verdict.CREDENTIALS
    if code in CLOCK_ERRORS:
        return Verdict.CLOCK
    if code in TRANSIENT_ERRORS:
        return Verdict.TRANSIENT
    if code in REGION_ERRORS or failure.redirect or status == 301:
        return Verdict.WRONG_REGION
    if code in LOCATION_ERRORS:
        return Verdict.BAD_LOCATION
    if status == 404 or code in NOT_FOUND_ERRORS:
        return Verdict.NOT_FOUND
    if status is None:
        return Verdict.TRANSIENT
    if status == 401:
        return Verdict.CREDENTIALS
    if status in TRANSIENT_STATUSES or status >= 500:
        return Verdict.TRANSIENT
    if 400 <= status < 500:
        return Verdict.FORBIDDEN
    return Verdict.TRANSIENT


# --- the frame store -----------------------------------------------------------------------------


class S3FrameStore:
    """:class:`~inference_service.ports.FrameStore` on S3, with bounded concurrency."""

    def __init__(self, settings: Settings, *, max_retries: int | None = None) -> None:
        """``max_retries``: obstore's own retries of a request (5xx, throttling, connection
        errors) before :meth:`get` reports it; None keeps :func:`open_store`'s."""
        self._settings = settings
        self._endpoint = settings.s3_endpoint_url
        self._max_bytes = settings.max_frame_bytes
        self._stores: OrderedDict[str, S3Store] = OrderedDict()
        self._limit = asyncio.Semaphore(settings.s3_concurrency)
        self._max_retries = max_retries
        self._service_error_logged_at: float | None = None

    def _store(self, bucket: str) -> S3Store:
        store = self._stores.get(bucket)
        if store is None:
            if self._max_retries is None:
                store = open_store(self._settings, bucket)
            else:
                store = open_store(self._settings, bucket, max_retries=self._max_retries)
            self._stores[bucket] = store
            if len(self._stores) > MAX_CACHED_BUCKETS:
                self._stores.popitem(last=False)
        else:
            self._stores.move_to_end(bucket)
        return store

    async def get(self, bucket: str, key: str, admit: Admit | None = None) -> bytes:
        """The object's bytes. Messages name the object and the rule it broke, never its
        content (a result is read by whoever sent the task)."""
        async with self._limit:
            try:
                result = await obstore.get_async(self._store(bucket), key)
                size = result.meta["size"]
                if size > self._max_bytes:
                    raise FrameTooLargeError(
                        f"s3://{bucket}/{key} is {size} bytes, over the limit of "
                        f"{self._max_bytes} ({env_name('max_frame_bytes')})"
                    )
                if admit is not None:
                    await admit(size)  # the body is read only once the budget has room for it
                data = await result.bytes_async()
            except InvalidPathError as exc:
                raise InvalidTaskError(
                    f"s3 key {key!r} is not a valid object path: {exc}"
                ) from None
            except InferenceError:
                raise
            except Exception as exc:  # obstore raises GenericError and friends, and built-ins
                raise self._failed(S3Failure.of(exc), bucket, key, exc) from None
        return bytes(data)

    def _failed(
        self, failure: S3Failure, bucket: str, key: str, exc: BaseException
    ) -> InferenceError:
        """The error a failed GET of ``s3://bucket/key`` raises (see :func:`classify`)."""
        where = f"s3://{bucket}/{key}"
        said = failure.describe()
        verdict = classify(failure)
        if verdict is Verdict.NOT_FOUND:
            return FrameNotFoundError(f"no object {where}")
        if verdict is Verdict.FORBIDDEN:
            return FrameForbiddenError(
                f"S3 refused to read {where} ({said}): the service's credentials may not read "
                "it (on AWS a missing key is a 403 too without s3:ListBucket on the bucket)"
            )
        if verdict is Verdict.WRONG_REGION:
            return FrameForbiddenError(
                f"S3 answered {said} for {where}: bucket {bucket!r} is not in the region "
                f"requests are signed for ({env_name('s3_region')}={self._settings.s3_region})"
            )
        if verdict is Verdict.BAD_LOCATION:
            return InvalidTaskError(f"S3 refused {where} as invalid ({said})")
        if verdict is Verdict.CREDENTIALS:
            self._log_service_error(
                "S3 at %s refused the service's credentials (%s) on GET %s: check "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN), or the role "
                "the service runs under; consumption stays paused until they work",
                self._endpoint or "AWS", said, where,
            )  # fmt: skip
            return StoreUnavailableError(
                f"S3 refused the credentials ({said}) on GET {where}: check AWS_ACCESS_KEY_ID "
                "and AWS_SECRET_ACCESS_KEY"
            )
        if verdict is Verdict.CLOCK:
            self._log_service_error(
                "S3 at %s refused GET %s: this host's clock is off (%s); fix its time "
                "synchronisation (NTP); consumption stays paused until then",
                self._endpoint or "AWS", where, said,
            )  # fmt: skip
            return StoreUnavailableError(f"S3 refused GET {where}: the clock is off ({said})")
        return StoreUnavailableError(f"S3 GET {where} failed ({said}): {type(exc).__name__}: {exc}")

    def _log_service_error(self, message: str, *args: object) -> None:
        """Log a refusal of the whole service as an error, at most every
        :data:`SERVICE_ERROR_LOG_EVERY_S` (each paused task retries it)."""
        now = time.monotonic()
        last = self._service_error_logged_at
        if last is None or now - last >= SERVICE_ERROR_LOG_EVERY_S:
            self._service_error_logged_at = now
            log.error(message, *args)

    async def check(self, bucket: str) -> None:
        """Ask the store for one listing page of ``bucket``; raise if it cannot answer."""
        try:
            stream = obstore.list(self._store(bucket), chunk_size=1)
            await anext(aiter(stream), None)
        except (NotFoundError, FileNotFoundError) as exc:
            raise StoreUnavailableError(f"bucket {bucket!r} does not exist: {exc}") from exc
        except Exception as exc:
            refused = _refused_credentials(str(exc))
            if refused is not None:
                # Waiting does not mend wrong keys: stop start-up with what to fix.
                raise ConfigError(
                    f"S3 at {self._endpoint or 'AWS'} refused the credentials ({refused}); "
                    "check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN "
                    "(or the role the service runs under)"
                ) from None
            raise StoreUnavailableError(
                f"S3 at {self._endpoint or 'AWS'} does not answer for bucket {bucket!r}: {exc}"
            ) from exc


def _refused_credentials(message: str) -> str | None:
    """The S3 error code in ``message`` if it refuses the credentials, else None."""
    return next((code for code in CREDENTIAL_ERRORS if f"<Code>{code}</Code>" in message), None)

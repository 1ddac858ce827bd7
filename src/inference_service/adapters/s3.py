"""Frames from S3 (or any S3-compatible server) through obstore: pooled connections, async GETs.

One ``S3Store`` per bucket, made on first use and kept. Errors map onto the service's tree:
a missing object or bucket is ``FrameNotFoundError`` (poison), an object over the byte limit is
``FrameTooLargeError`` (poison), everything else (refused connection, 5xx, timeouts, credentials
refused) is ``StoreUnavailableError`` (retriable: consumption pauses, the frame is tried again).
"""

from __future__ import annotations

import asyncio
import logging
import os
from datetime import timedelta
from typing import TYPE_CHECKING

import obstore
from obstore.exceptions import InvalidPathError, NotFoundError
from obstore.store import S3Store

from inference_service.errors import (
    ConfigError,
    FrameNotFoundError,
    FrameTooLargeError,
    InvalidTaskError,
    StoreUnavailableError,
)

if TYPE_CHECKING:
    from obstore.store import ClientConfig, RetryConfig

    from inference_service.settings import Settings

log = logging.getLogger(__name__)


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
    kwargs: dict[str, str] = {"region": settings.s3_region}
    if settings.s3_endpoint_url:
        kwargs["endpoint"] = settings.s3_endpoint_url
    key_id = os.environ.get("AWS_ACCESS_KEY_ID")
    secret = os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key_id and secret:
        kwargs["access_key_id"] = key_id
        kwargs["secret_access_key"] = secret
        if token := os.environ.get("AWS_SESSION_TOKEN"):
            kwargs["session_token"] = token
    return S3Store(
        bucket,
        client_options=client,
        retry_config=retry,
        virtual_hosted_style_request=False,
        **kwargs,  # type: ignore[arg-type]
    )


class S3FrameStore:
    """:class:`~inference_service.ports.FrameStore` on S3, with bounded concurrency."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._endpoint = settings.s3_endpoint_url
        self._max_bytes = settings.max_frame_bytes
        self._stores: dict[str, S3Store] = {}
        self._limit = asyncio.Semaphore(settings.s3_concurrency)

    def _store(self, bucket: str) -> S3Store:
        store = self._stores.get(bucket)
        if store is None:
            store = open_store(self._settings, bucket)
            self._stores[bucket] = store
        return store

    async def get(self, bucket: str, key: str) -> bytes:
        async with self._limit:
            try:
                result = await obstore.get_async(self._store(bucket), key)
                size = result.meta["size"]
                if size > self._max_bytes:
                    raise FrameTooLargeError(
                        f"s3://{bucket}/{key} is {size} bytes, over the limit of "
                        f"{self._max_bytes} (INFERENCE_MAX_FRAME_BYTES)"
                    )
                data = await result.bytes_async()
            except (NotFoundError, FileNotFoundError):
                raise FrameNotFoundError(f"no object s3://{bucket}/{key}") from None
            except InvalidPathError as exc:
                raise InvalidTaskError(
                    f"s3 key {key!r} is not a valid object path: {exc}"
                ) from None
            except (FrameTooLargeError, FrameNotFoundError, InvalidTaskError):
                raise
            except Exception as exc:  # obstore raises GenericError and friends for I/O failures
                raise StoreUnavailableError(
                    f"S3 GET s3://{bucket}/{key} failed: {type(exc).__name__}: {exc}"
                ) from exc
        return bytes(data)

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


CREDENTIAL_ERRORS = (
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
)
"""S3 error codes that say the credentials themselves are wrong (not a missing permission)."""


def _refused_credentials(message: str) -> str | None:
    """The S3 error code in ``message`` if it refuses the credentials, else None."""
    return next((code for code in CREDENTIAL_ERRORS if f"<Code>{code}</Code>" in message), None)

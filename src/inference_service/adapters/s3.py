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
    FrameNotFoundError,
    FrameTooLargeError,
    InvalidTaskError,
    StoreUnavailableError,
)

if TYPE_CHECKING:
    from obstore.store import ClientConfig, RetryConfig

    from inference_service.settings import Settings

log = logging.getLogger(__name__)


class S3FrameStore:
    """:class:`~inference_service.ports.FrameStore` on S3, with bounded concurrency."""

    def __init__(self, settings: Settings) -> None:
        self._endpoint = settings.s3_endpoint_url
        self._region = settings.s3_region
        self._max_bytes = settings.max_frame_bytes
        self._stores: dict[str, S3Store] = {}
        self._limit = asyncio.Semaphore(settings.s3_concurrency)

    def _store(self, bucket: str) -> S3Store:
        store = self._stores.get(bucket)
        if store is None:
            client: ClientConfig = {
                "allow_http": True,
                "connect_timeout": timedelta(seconds=3),
                "timeout": timedelta(seconds=30),
                "pool_max_idle_per_host": "64",
            }
            retry: RetryConfig = {"max_retries": 2, "retry_timeout": timedelta(seconds=10)}
            kwargs: dict[str, str] = {"region": self._region}
            if self._endpoint:
                kwargs["endpoint"] = self._endpoint
            key_id = os.environ.get("AWS_ACCESS_KEY_ID")
            secret = os.environ.get("AWS_SECRET_ACCESS_KEY")
            if key_id and secret:
                kwargs["access_key_id"] = key_id
                kwargs["secret_access_key"] = secret
                token = os.environ.get("AWS_SESSION_TOKEN")
                if token:
                    kwargs["session_token"] = token
            store = S3Store(
                bucket,
                client_options=client,
                retry_config=retry,
                virtual_hosted_style_request=False,
                **kwargs,  # type: ignore[arg-type]
            )
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
            raise StoreUnavailableError(
                f"S3 at {self._endpoint or 'AWS'} does not answer for bucket {bucket!r}: {exc}"
            ) from exc

"""Parsing task records (SPEC.md, Tasks) into :class:`~inference_service.domain.Task`.

Pure logic, no I/O. A record that is not a JSON object raises :class:`NotJsonError` (it goes to the
dead-letter topic only); a JSON object that is not a valid task raises ``InvalidTaskError`` and the
caller still publishes an error result with whatever identity the record carries
(:func:`partial_identity`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from inference_service import strict_json
from inference_service.domain import JsonObject, Task, is_bucket_name
from inference_service.errors import InvalidTaskError, NotJsonError
from inference_service.results import Identity
from inference_service.settings import env_name

KEY_ALIASES = ("s3_key", "frame_path", "s3_path", "path")
MAX_KEY_BYTES = 1024
MAX_ID_CHARS = 512
MAX_BUCKET_CHARS = 63


def decode_record(value: bytes | None) -> JsonObject:
    """The record's JSON object.

    Raises :class:`NotJsonError` for a value that is not a JSON object, and ``InvalidTaskError``
    (with what could be read) for JSON a strict reader would refuse: NaN, Infinity, numbers that
    overflow, lone surrogates, nesting deeper than :data:`~inference_service.strict_json.MAX_DEPTH`.
    """
    if value is None:
        raise NotJsonError("the record has no value (tombstone)")
    try:
        obj = json.loads(value)
    except RecursionError:
        obj = _loads_pruned(value)
        too_deep = f"the record nests deeper than {strict_json.MAX_DEPTH} levels"
        if obj is None:  # not an object even when pruned: nothing to answer to
            raise NotJsonError(f"{too_deep} and is not a JSON object") from None
        raise InvalidTaskError(too_deep, readable=obj) from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise NotJsonError(f"the record is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise NotJsonError(f"the record is JSON but not an object (got {type(obj).__name__})")
    try:
        strict_json.check(obj)
    except strict_json.StrictJsonError as exc:
        raise InvalidTaskError(f"the record is not strict JSON: {exc}", readable=obj) from None
    return obj


def _loads_pruned(value: bytes) -> JsonObject | None:
    """The top-level fields of a record nested too deep to parse, deep containers as null."""
    try:
        obj = json.loads(strict_json.prune(value))
    except (RecursionError, UnicodeDecodeError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


@dataclass(frozen=True, slots=True)
class TaskRules:
    """Where a task may read its frame from (the service's settings, as a value)."""

    default_bucket: str
    """The bucket of a task that names none (``INFERENCE_S3_BUCKET``)."""
    allowed_buckets: frozenset[str] | None
    """The buckets a task may name, the default one among them; None: any bucket the
    credentials reach (``INFERENCE_S3_ALLOWED_BUCKETS=*``)."""

    @classmethod
    def of(cls, default_bucket: str, allowed: frozenset[str] | None = frozenset()) -> TaskRules:
        """Rules allowing ``default_bucket`` and ``allowed`` (None: any bucket)."""
        return cls(default_bucket, None if allowed is None else allowed | {default_bucket})

    def allows(self, bucket: str) -> bool:
        """Whether a task may name ``bucket``."""
        return self.allowed_buckets is None or bucket in self.allowed_buckets


def parse_task(obj: JsonObject, rules: TaskRules) -> Task:
    """A validated task; raises ``InvalidTaskError`` naming the first problem."""
    video_id = obj.get("video_id")
    if not isinstance(video_id, str) or not video_id:
        raise InvalidTaskError("video_id must be a non-empty string")
    if len(video_id) > MAX_ID_CHARS:
        raise InvalidTaskError(f"video_id is longer than {MAX_ID_CHARS} characters")
    frame_id = obj.get("frame_id")
    if isinstance(frame_id, bool) or not isinstance(frame_id, int):
        raise InvalidTaskError("frame_id must be an integer >= 0")
    if frame_id < 0:
        raise InvalidTaskError(f"frame_id must be >= 0 (got {frame_id})")

    raw_key: Any = None
    for alias in KEY_ALIASES:
        if alias in obj:
            raw_key = obj[alias]
            break
    if not isinstance(raw_key, str) or not raw_key:
        raise InvalidTaskError("s3_key (or frame_path, s3_path, path) must be a non-empty string")

    bucket_field = obj.get("bucket")
    if bucket_field is not None and (not isinstance(bucket_field, str) or not bucket_field):
        raise InvalidTaskError("bucket must be a non-empty string when given")
    bucket, key = split_location(raw_key, bucket_field or rules.default_bucket)
    check_bucket(bucket)
    if not rules.allows(bucket):
        # Results are read by whoever sends tasks: no reading of buckets the operator did not
        # name, whatever the credentials reach.
        raise InvalidTaskError(
            f"bucket {bucket!r} is not one this service reads: add it to "
            f"{env_name('s3_allowed_buckets')} to allow it"
        )
    check_key(key)

    task_id = obj.get("task_id")
    if task_id is None:
        task_id = f"{video_id}:{frame_id}"
    elif not isinstance(task_id, str) or not task_id or len(task_id) > MAX_ID_CHARS:
        raise InvalidTaskError(f"task_id must be a non-empty string of at most {MAX_ID_CHARS}")
    meta = obj.get("meta")
    if meta is not None and not isinstance(meta, dict):
        raise InvalidTaskError("meta must be an object when given")
    return Task(
        video_id=video_id,
        frame_id=frame_id,
        s3_key=key,
        bucket=bucket,
        task_id=task_id,
        meta=meta,
    )


def split_location(raw: str, bucket: str) -> tuple[str, str]:
    """``(bucket, key)`` from a plain key or an ``s3://bucket/key`` URI."""
    if raw.startswith("s3://"):
        rest = raw[len("s3://") :]
        uri_bucket, sep, key = rest.partition("/")
        if not uri_bucket or not sep or not key:
            raise InvalidTaskError(f"s3 URI {raw!r} must look like s3://bucket/key")
        return uri_bucket, key
    return bucket, raw


def check_bucket(bucket: str) -> None:
    """Refuse names that are not S3 bucket names (3-63 of a-z, 0-9, '.', '-')."""
    if not is_bucket_name(bucket):
        raise InvalidTaskError(f"bucket {bucket!r} is not a valid S3 bucket name")


def check_key(key: str) -> None:
    """Refuse keys that name no object safely: control characters, '.'/'..' segments, '//'."""
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise InvalidTaskError(f"s3 key is longer than {MAX_KEY_BYTES} bytes")
    if any(ord(c) < 32 or ord(c) == 127 for c in key):
        raise InvalidTaskError("s3 key contains control characters")
    if key.startswith("/") or key.endswith("/"):
        raise InvalidTaskError(f"s3 key {key!r} must not start or end with '/'")
    for part in key.split("/"):
        if part in ("", ".", ".."):
            raise InvalidTaskError(f"s3 key {key!r} has an empty, '.' or '..' segment")
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidTaskError("s3 key is not valid UTF-8") from None


def partial_identity(obj: JsonObject | None, key: bytes | None, default_bucket: str) -> Identity:
    """The identity an error result of an invalid task can still carry.

    Fields of the wrong type are dropped (None); the video id falls back to the record key.
    """
    obj = obj or {}
    video_id = _text(obj.get("video_id"), MAX_ID_CHARS)
    if not video_id:  # missing, empty, too long or unusable: the record key names the video
        video_id = key.decode("utf-8", "replace")[:MAX_ID_CHARS] if key else ""
    frame_id = obj.get("frame_id")
    if isinstance(frame_id, bool) or not isinstance(frame_id, int) or frame_id < 0:
        frame_id = None
    s3_key: str | None = None
    for alias in KEY_ALIASES:
        if (found := _text(obj.get(alias), MAX_KEY_BYTES)) is not None:
            s3_key = found
            break
    bucket = _text(obj.get("bucket"), MAX_BUCKET_CHARS)
    task_id = _text(obj.get("task_id"), MAX_ID_CHARS)
    if task_id is None:
        task_id = f"{video_id}:{frame_id}" if frame_id is not None else None
    meta = obj.get("meta")
    if not strict_json.is_strict(meta):
        meta = None  # an error result stays strict JSON: the bad meta is in the dead letter
    return Identity(
        task_id=task_id,
        video_id=video_id,
        frame_id=frame_id,
        bucket=bucket or default_bucket,
        s3_key=s3_key,
        meta=meta if isinstance(meta, dict) else None,
    )


def _text(value: object, max_chars: int) -> str | None:
    """``value`` if it is a string of at most ``max_chars`` that strict JSON can carry (valid
    Unicode), else None: an error result never repeats an unbounded field."""
    if not isinstance(value, str) or len(value) > max_chars:
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return value

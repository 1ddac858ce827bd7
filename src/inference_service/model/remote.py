"""Models in S3 (``INFERENCE_MODEL=s3://bucket/key``), fetched once into the cache and reused
while unchanged.

Three kinds of location:

- ``s3://bucket/key.onnx`` or ``s3://bucket/key.pt``: one object;
- ``s3://bucket/prefix/`` (a trailing ``/``, or a key without a model suffix): a model directory
  uploaded as it is (``manifest.json`` and its files under the prefix).

Each start asks S3 once what is there (one HEAD for an object, one listing for a prefix) and
fingerprints the answer (keys, ETags, sizes): the *version*. A version is downloaded once into
``<cache_dir>/s3/<bucket>/<slug of the key>/<version>/``, into a temporary directory renamed into
place when complete and verified, under an exclusive lock, so that processes starting together
download it once and never see half of it. A version directory is never changed afterwards (a
process serving it keeps reading intact files while a newer version arrives); the two newest
versions are kept, older ones removed.

Verification: an object's size must match the HEAD, and its MD5 the ETag when the ETag is a plain
MD5 (not a multipart upload's); ``s3-object.json`` beside it records the ETag, size and sha256,
and a reused copy is checked against the recorded size and sha256. A directory is checked against
its manifest's sizes and sha256 (:func:`~inference_service.model.manifest.verify_directory`).

S3 access goes through :class:`ObjectReader`, so that the fetch logic is tested with a fake; the
real one (:func:`open_reader`) uses obstore with the service's S3 settings and conventions
(``INFERENCE_S3_ENDPOINT_URL``, ``INFERENCE_S3_REGION``, credentials from ``AWS_ACCESS_KEY_ID``/
``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN`` or obstore's chain, path-style addressing). It is
built here rather than taken from the S3 adapter: the model layer does not import adapters.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Protocol

from inference_service.domain import is_bucket_name
from inference_service.errors import ModelError
from inference_service.model.locking import exclusive
from inference_service.model.manifest import (
    MANIFEST_NAME,
    Manifest,
    file_sha256,
    verify_directory,
)
from inference_service.settings import env_name

if TYPE_CHECKING:
    from inference_service.settings import Settings

log = logging.getLogger(__name__)

OBJECT_SUFFIXES = (".onnx", ".pt", ".pth")
"""Keys with these suffixes name one model object; any other key names a directory prefix."""
RECORD_NAME = "s3-object.json"
"""Beside a downloaded object: its URI, ETag, size and sha256 (marks the version complete)."""
DIRECTORY_RECORD_NAME = "s3-listing.json"
"""Beside a downloaded directory: the listing it was fetched from (marks the version complete)."""
KEEP_VERSIONS = 2
"""Versions of one location kept in the cache (the newest; older ones are removed)."""
CREDENTIALS_HINT = (
    "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or the instance's role), "
    f"{env_name('s3_endpoint_url')} and {env_name('s3_region')}"
)
_PLAIN_MD5 = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True, slots=True)
class S3Location:
    """A parsed ``s3://bucket/key``."""

    bucket: str
    key: str
    """The object key, or the prefix (ending in ``/``, or empty) of a model directory."""

    @property
    def is_directory(self) -> bool:
        return self.key == "" or self.key.endswith("/")

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.key).suffix.lower() if not self.is_directory else ""


def parse_s3_uri(uri: str) -> S3Location:
    """``s3://bucket/key`` → :class:`S3Location`; :class:`ModelError` naming the setting when it
    is not one. A key without a model suffix (``.onnx``, ``.pt``) is a directory prefix."""
    rest = uri.strip().removeprefix("s3://")
    bucket, _, key = rest.partition("/")
    if not uri.strip().startswith("s3://") or not is_bucket_name(bucket):
        raise ModelError(
            f"{env_name('model')}={uri}: expected s3://bucket/key.onnx, s3://bucket/key.pt or "
            "s3://bucket/prefix/ (a model directory), with a bucket name of 3-63 of a-z, 0-9, "
            "'.' and '-'"
        )
    if ".." in PurePosixPath(key).parts:
        raise ModelError(f"{env_name('model')}={uri}: '..' in an S3 key is not supported")
    if key and not key.endswith("/") and PurePosixPath(key).suffix.lower() not in OBJECT_SUFFIXES:
        key += "/"
    return S3Location(bucket, key)


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """What S3 says about one object."""

    key: str
    size: int
    etag: str
    """The ETag without its quotes (``""`` when the server sends none)."""


class RemoteMissingError(Exception):
    """No such object or bucket (S3 404)."""


class RemoteDeniedError(Exception):
    """The credentials are refused or lack the permission (S3 401/403)."""


class ObjectReader(Protocol):
    """Read access to one bucket."""

    def head(self, key: str) -> ObjectInfo:
        """The object's size and ETag; :class:`RemoteMissingError`/:class:`RemoteDeniedError`."""
        ...

    def list(self, prefix: str) -> list[ObjectInfo]:
        """Every object under ``prefix``, in key order (empty when none)."""
        ...

    def download(self, key: str, dest: Path) -> str:
        """Write the object to ``dest``; the MD5 hex digest of what was written."""
        ...


# --- what there is -------------------------------------------------------------------------------


def remote_listing(location: S3Location, reader: ObjectReader) -> list[ObjectInfo]:
    """What S3 holds at ``location`` (one HEAD or one listing); :class:`ModelError` naming the
    location when nothing is there or access is refused."""
    try:
        if not location.is_directory:
            return [reader.head(location.key)]
        listed = [o for o in reader.list(location.key) if not o.key.endswith("/")]
    except RemoteMissingError:
        raise ModelError(
            f"{env_name('model')}={location.uri}: no such object or bucket (check the bucket "
            f"{location.bucket!r} and the key {location.key!r}; a directory prefix ends with /)"
        ) from None
    except RemoteDeniedError as exc:
        raise ModelError(
            f"{env_name('model')}={location.uri}: access denied to bucket {location.bucket!r}, "
            f"key {location.key!r} ({exc}); check the credentials ({CREDENTIALS_HINT}) and that "
            "they may read (and list) it"
        ) from None
    if not listed:
        raise ModelError(
            f"{env_name('model')}={location.uri}: no objects under the prefix {location.key!r} "
            f"in bucket {location.bucket!r}; expected a model directory made by "
            "`inference-service export` (or name an .onnx or .pt object)"
        )
    if not any(o.key == location.key + MANIFEST_NAME for o in listed):
        raise ModelError(
            f"{env_name('model')}={location.uri}: no {MANIFEST_NAME} under the prefix (found "
            f"{', '.join(o.key for o in listed[:5])}{', ...' if len(listed) > 5 else ''}); "
            "expected a model directory made by `inference-service export`, uploaded as it is"
        )
    return listed


def fingerprint(location: S3Location, listed: list[ObjectInfo]) -> str:
    """The version of what S3 holds at ``location``: a hash of the keys, ETags and sizes."""
    rows = [[o.key.removeprefix(location.key), o.etag, o.size] for o in listed]
    text = json.dumps([location.uri, sorted(rows)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def location_root(cache: Path, location: S3Location) -> Path:
    """The cache folder of every version of ``location``: ``<cache>/s3/<bucket>/<slug>``."""
    digest = hashlib.sha256(location.key.encode()).hexdigest()[:12]
    tail = PurePosixPath(location.key.rstrip("/")).name or "root"
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", tail)[:60]
    return cache / "s3" / location.bucket / f"{safe}-{digest}"


# --- fetching ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Fetched:
    """A model fetched from S3 into the cache."""

    location: S3Location
    path: Path
    """The local object file, or the local model directory."""
    version: str
    downloaded: bool
    """False when the cache held this version already (nothing was downloaded)."""


def fetch(settings: Settings, location: S3Location, reader: ObjectReader) -> Fetched:
    """The local copy of ``location`` at its current version, downloaded when not cached."""
    listed = remote_listing(location, reader)
    version = fingerprint(location, listed)
    root = location_root(settings.cache_path(), location)
    entry = root / version
    found = _cached(location, entry, listed)
    if found is not None:
        log.info(
            "model %s unchanged (version %s): reusing %s, nothing downloaded",
            location.uri,
            version,
            found,
        )
        return Fetched(location, found, version, downloaded=False)
    try:
        root.mkdir(parents=True, exist_ok=True)
        (root / ".lock").touch()
    except OSError as exc:
        raise ModelError(
            f"{env_name('model')}={location.uri}: cannot write the download to {root} "
            f"({exc.strerror or exc}); point {env_name('cache_dir')} at a writable directory"
        ) from None
    with exclusive(root / ".lock"):
        found = _cached(location, entry, listed)
        if found is None:
            found = _download(location, entry, listed, reader)
            _prune(root, keep=entry)
            downloaded = True
        else:
            downloaded = False
    return Fetched(location, found, version, downloaded=downloaded)


def cached_copy(settings: Settings, location: S3Location, reader: ObjectReader) -> Path | None:
    """The local copy of ``location``'s current version when the cache holds it, else None
    (nothing is downloaded)."""
    listed = remote_listing(location, reader)
    entry = location_root(settings.cache_path(), location) / fingerprint(location, listed)
    return _cached(location, entry, listed)


def _object_name(location: S3Location) -> str:
    return PurePosixPath(location.key).name


def _directory_name(location: S3Location) -> str:
    """The local name of a downloaded model directory: the prefix's last segment (the model's
    name in results, as a local directory's own name is)."""
    name = PurePosixPath(location.key.rstrip("/")).name
    return name if name and not name.startswith(".") else "model"


def _cached(location: S3Location, entry: Path, listed: list[ObjectInfo]) -> Path | None:
    """The complete, intact copy in ``entry``, or None (a damaged copy is logged and ignored)."""
    if location.is_directory:
        record = entry / DIRECTORY_RECORD_NAME
        if not record.is_file():
            return None
        # Verified against its manifest by resolve_model at each start.
        return entry / _directory_name(location)
    record = entry / RECORD_NAME
    path = entry / _object_name(location)
    uri = location.uri
    if not record.is_file():
        return None
    try:
        recorded = json.loads(record.read_text())
        size = path.stat().st_size
    except (OSError, ValueError) as exc:
        log.warning("model %s: cached copy %s unreadable (%s); fetching again", uri, entry, exc)
        return None
    if size != listed[0].size or size != recorded.get("size"):
        log.warning("model %s: cached copy %s has the wrong size; fetching again", uri, path)
        return None
    if file_sha256(path) != recorded.get("sha256"):
        log.warning("model %s: cached copy %s is altered; fetching again", uri, path)
        return None
    return path


def _download(
    location: S3Location, entry: Path, listed: list[ObjectInfo], reader: ObjectReader
) -> Path:
    tmp = entry.parent / f".tmp-{entry.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    started = time.monotonic()
    try:
        tmp.mkdir(parents=True)
        if location.is_directory:
            total = _download_directory(location, tmp, listed, reader)
            (tmp / DIRECTORY_RECORD_NAME).write_text(
                json.dumps(
                    {"uri": location.uri, "objects": [[o.key, o.etag, o.size] for o in listed]},
                    indent=2,
                )
                + "\n"
            )
            result = entry / _directory_name(location)
        else:
            info = listed[0]
            path = tmp / _object_name(location)
            _get(location, reader, info, path)
            total = info.size
            (tmp / RECORD_NAME).write_text(
                json.dumps(
                    {
                        "uri": location.uri,
                        "etag": info.etag,
                        "size": info.size,
                        "sha256": file_sha256(path),
                    },
                    indent=2,
                )
                + "\n"
            )
            result = entry / path.name
        shutil.rmtree(entry, ignore_errors=True)  # an incomplete entry of a crash
        tmp.rename(entry)
    except OSError as exc:
        raise ModelError(
            f"{env_name('model')}={location.uri}: cannot write the download to {entry.parent} "
            f"({exc.strerror or exc}); point {env_name('cache_dir')} at a writable directory"
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info(
        "model %s: downloaded %d bytes in %.1f s into %s",
        location.uri,
        total,
        time.monotonic() - started,
        result,
    )
    return result


def _download_directory(
    location: S3Location, tmp: Path, listed: list[ObjectInfo], reader: ObjectReader
) -> int:
    """Download the manifest, then every file it lists; verify; the bytes downloaded."""
    by_key = {o.key: o for o in listed}
    model = tmp / _directory_name(location)
    model.mkdir()
    manifest_key = location.key + MANIFEST_NAME
    _get(location, reader, by_key[manifest_key], model / MANIFEST_NAME)
    where = f"s3://{location.bucket}/{manifest_key}"
    manifest = Manifest.from_json((model / MANIFEST_NAME).read_text(encoding="utf-8"), where)
    total = by_key[manifest_key].size
    for name in sorted(manifest.files):
        info = by_key.get(location.key + name)
        if info is None:
            raise ModelError(
                f"{env_name('model')}={location.uri}: {name} (listed in {MANIFEST_NAME}) is not "
                f"in the bucket: the upload is incomplete; upload the whole directory again"
            )
        target = model / name
        target.parent.mkdir(parents=True, exist_ok=True)
        _get(location, reader, info, target)
        total += info.size
    verify_directory(model, manifest)
    return total


def _get(location: S3Location, reader: ObjectReader, info: ObjectInfo, dest: Path) -> None:
    """Download one object and check its size (and MD5 against a plain-MD5 ETag)."""
    uri = f"s3://{location.bucket}/{info.key}"
    try:
        md5 = reader.download(info.key, dest)
    except RemoteMissingError:
        raise ModelError(
            f"{env_name('model')}={location.uri}: {uri} disappeared while downloading; start "
            "again once the upload is complete"
        ) from None
    except RemoteDeniedError as exc:
        raise ModelError(
            f"{env_name('model')}={location.uri}: access denied to {uri} ({exc}); check the "
            f"credentials ({CREDENTIALS_HINT})"
        ) from None
    size = dest.stat().st_size
    if size != info.size:
        raise ModelError(
            f"{env_name('model')}={location.uri}: {uri} downloaded {size} bytes, S3 says "
            f"{info.size}: the object changed while downloading; start again"
        )
    if _PLAIN_MD5.match(info.etag) and md5 != info.etag:
        # With SSE-KMS or SSE-C encryption a single-part ETag is not the content's MD5: two
        # downloads that agree are taken as the object (directories are verified against their
        # manifest's sha256 afterwards as well).
        again = reader.download(info.key, dest)
        if again != md5:
            raise ModelError(
                f"{env_name('model')}={location.uri}: {uri}: MD5 {md5} of the download does not "
                f"match its ETag {info.etag}, and a second download differs ({again}): "
                "corrupted in transfer or changed; start again"
            )
        log.warning(
            "%s: its ETag %s is not the MD5 of its content (%s; e.g. SSE-KMS or SSE-C "
            "encryption): two downloads agree, using it",
            uri, info.etag, md5,
        )  # fmt: skip


def _prune(root: Path, *, keep: Path) -> None:
    """Remove all but the :data:`KEEP_VERSIONS` newest versions (and stale temporaries)."""
    try:
        versions = sorted(
            (p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
            key=lambda p: p.stat().st_mtime_ns,
            reverse=True,
        )
        stale = [p for p in versions if p != keep][KEEP_VERSIONS - 1 :]
        stale += [p for p in root.iterdir() if p.name.startswith(".tmp-")]
    except OSError as exc:
        log.debug("model cache %s: not pruned (%s)", root, exc)
        return
    for path in stale:
        log.info("model cache: removing the old version %s", path)
        shutil.rmtree(path, ignore_errors=True)


# --- the real reader -----------------------------------------------------------------------------


class ObstoreReader:
    """:class:`ObjectReader` over obstore, with the service's S3 settings."""

    def __init__(self, settings: Settings, bucket: str, *, timeout_s: float = 600.0) -> None:
        from obstore.store import S3Store

        kwargs: dict[str, Any] = dict(settings.s3_store_options())
        self._store = S3Store(
            bucket,
            client_options={
                "allow_http": True,
                "connect_timeout": timedelta(seconds=5),
                "timeout": timedelta(seconds=timeout_s),  # a whole download of a large model
            },
            retry_config={"max_retries": 3, "retry_timeout": timedelta(seconds=30)},
            virtual_hosted_style_request=False,
            **kwargs,
        )

    def head(self, key: str) -> ObjectInfo:
        import obstore

        with _translated():
            meta = obstore.head(self._store, key)
        return ObjectInfo(str(meta["path"]), int(meta["size"]), _etag(meta.get("e_tag")))

    def list(self, prefix: str) -> list[ObjectInfo]:
        import obstore

        out: list[ObjectInfo] = []
        with _translated():
            for batch in obstore.list(self._store, prefix=prefix or None, chunk_size=1000):
                out.extend(
                    ObjectInfo(str(m["path"]), int(m["size"]), _etag(m.get("e_tag"))) for m in batch
                )
        return sorted(out, key=lambda o: o.key)

    def download(self, key: str, dest: Path) -> str:
        import obstore

        md5 = hashlib.md5(usedforsecurity=False)
        with _translated(), dest.open("wb") as handle:
            for chunk in obstore.get(self._store, key).stream(min_chunk_size=1 << 20):
                data = bytes(chunk)
                md5.update(data)
                handle.write(data)
        return md5.hexdigest()


def open_reader(settings: Settings, bucket: str) -> ObjectReader:
    """The real S3 reader of ``bucket``."""
    return ObstoreReader(settings, bucket)


def _etag(raw: object) -> str:
    return str(raw or "").strip('"')


@contextlib.contextmanager
def _translated() -> Iterator[None]:
    """obstore's errors as :class:`RemoteMissingError`, :class:`RemoteDeniedError` or
    :class:`ModelError`."""
    from obstore.exceptions import NotFoundError, PermissionDeniedError, UnauthenticatedError

    try:
        yield
    except (FileNotFoundError, NotFoundError) as exc:
        raise RemoteMissingError(str(exc).splitlines()[0] if str(exc) else "not found") from None
    except (PermissionDeniedError, UnauthenticatedError) as exc:
        raise RemoteDeniedError(_short(exc)) from None
    except (RemoteMissingError, RemoteDeniedError, ModelError):
        raise
    except Exception as exc:  # obstore's error tree is untyped here: no answer, 5xx, ...
        text = str(exc)
        if "status code: 404" in text or "NoSuchKey" in text or "NoSuchBucket" in text:
            raise RemoteMissingError(_short(exc)) from None
        if "status code: 403" in text or "AccessDenied" in text or "status code: 401" in text:
            raise RemoteDeniedError(_short(exc)) from None
        raise ModelError(
            f"{env_name('model')}: S3 request failed: {_short(exc)} (check "
            f"{env_name('s3_endpoint_url')} and that S3 is reachable)"
        ) from None


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] or type(exc).__name__

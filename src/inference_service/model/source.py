"""Where the configured model comes from: a local path or ``s3://``, its cheap version, and the
local path to resolve (fetching an ``s3://`` model into the cache first).

:func:`model_version` is what a running service polls to notice a replaced model without reading
it: it downloads nothing and hashes at most a manifest.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

from inference_service.errors import ModelError
from inference_service.model.manifest import MANIFEST_NAME
from inference_service.model.remote import (
    Fetched,
    ObjectReader,
    S3Location,
    fetch,
    fingerprint,
    open_reader,
    parse_s3_uri,
    remote_listing,
)
from inference_service.settings import env_name

if TYPE_CHECKING:
    from inference_service.settings import Settings

REMOTE_SCHEME = "s3://"


def is_remote(model: str | Path) -> bool:
    """True when ``model`` names an S3 location (``s3://bucket/key``)."""
    text = str(model)
    # A Path made from "s3://b/k" reads "s3:/b/k": recognise that too rather than look for a file.
    return text.startswith(REMOTE_SCHEME) or (isinstance(model, Path) and text.startswith("s3:/"))


def remote_location(settings: Settings) -> S3Location:
    """The parsed ``INFERENCE_MODEL`` (only when :func:`is_remote`)."""
    text = str(settings.model)
    if isinstance(settings.model, Path) and not text.startswith(REMOTE_SCHEME):
        text = REMOTE_SCHEME + text.removeprefix("s3:/")
    return parse_s3_uri(text)


def model_version(settings: Settings, reader: ObjectReader | None = None) -> str:
    """A cheap fingerprint of the configured model source; it changes when the model is replaced.

    S3: the ETags and sizes of the object, or of every object under a directory's prefix (one
    HEAD or one listing; nothing downloaded). A local file: its size and mtime (with the ``.bin``
    beside an ``.xml``). A local model directory: its manifest (which lists every file's sha256).
    An OpenVINO IR directory: its ``.xml`` and ``.bin``. Raises :class:`ModelError` when the source
    cannot be read (missing, access refused, S3 unreachable).
    """
    if is_remote(settings.model):
        location = remote_location(settings)
        if reader is None:
            reader = open_reader(settings, location.bucket)
        return "s3:" + fingerprint(location, remote_listing(location, reader))
    path = Path(settings.model).expanduser()
    if path.is_dir():
        manifest = path / MANIFEST_NAME
        if manifest.is_file():
            try:
                digest = hashlib.sha256(manifest.read_bytes()).hexdigest()[:16]
            except OSError as exc:
                raise ModelError(f"cannot read {manifest}: {exc.strerror or exc}") from None
            return f"dir:{digest}"
        files = sorted(path.glob("*.xml")) + sorted(path.glob("*.bin"))
        return "ir:" + ",".join(_stat(p) for p in files)
    files = [path]
    if path.suffix.lower() == ".xml":
        files.append(path.with_suffix(".bin"))
    return "file:" + ",".join(_stat(p) for p in files)


def _stat(path: Path) -> str:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ModelError(
            f"{env_name('model')}: {path}: no such file or directory (working directory "
            f"{Path.cwd()})"
        ) from None
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {exc.strerror or exc}") from None
    return f"{path.name}:{st.st_size}:{st.st_mtime_ns}"


def fetch_remote(settings: Settings, reader: ObjectReader | None = None) -> Fetched:
    """Fetch the configured ``s3://`` model into the cache (reused while unchanged)."""
    location = remote_location(settings)
    if reader is None:
        reader = open_reader(settings, location.bucket)
    return fetch(settings, location, reader)

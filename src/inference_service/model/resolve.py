"""The one model setting to a runnable, checked model: :func:`resolve_model`.

- A ``.pt`` checkpoint is converted once (:mod:`inference_service.model.export`) to ONNX and
  OpenVINO IR and cached under ``<cache_dir>/<sha256 of the .pt>/``; later starts read the cache and
  need neither torch nor ultralytics. The conversion goes to a temporary directory that is renamed
  into place when complete, under an exclusive lock file, so that two processes starting together
  convert once and never see half a cache entry.
- An ``.onnx`` file is used as it is, its metadata read from its ``metadata_props``.
- Where ``pnnx`` is installed (the ``export`` extra), the ONNX model is also converted once to ncnn
  (``model.ncnn.param``/``.bin`` in the same cache entry, ``<cache_dir>/<sha256>/`` for an
  ``.onnx`` source) for the ncnn runtime.
- An OpenVINO IR directory (or its ``.xml``) is used as it is, its metadata read from
  ``metadata.yaml`` beside it or from its rt_info.

Anything that is not a YOLOv8 detection model is refused with a :class:`ModelError` that names what
was found and what is expected.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import logging
import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from inference_service.errors import ModelError
from inference_service.model.export import (
    NCNN_BIN,
    NCNN_PARAM,
    OPENVINO_NAME,
    export_onnx,
    ncnn_available,
    onnx_to_ncnn,
    onnx_to_openvino,
)
from inference_service.model.metadata import (
    ModelMetadata,
    read_onnx_metadata,
    read_openvino_metadata,
)
from inference_service.settings import Settings, env_name

log = logging.getLogger(__name__)

METADATA_NAME = "metadata.json"
"""Written last into a cache entry: its presence marks the entry complete."""


@dataclass(frozen=True, slots=True)
class ResolvedModel:
    """A model ready to open in a backend (picklable: it is sent to worker processes)."""

    source: Path
    """The file or directory the operator named."""
    sha256: str
    """sha256 of the source file (of its ``.xml`` then ``.bin`` for an OpenVINO directory)."""
    onnx_path: Path | None
    """The ONNX file to run, if there is one."""
    openvino_dir: Path | None
    """The directory of the OpenVINO IR to run, if there is one."""
    names: tuple[str, ...]
    """Class names by class id."""
    imgsz: tuple[int, int]
    """Inference size (height, width): the letterbox target."""
    stride: int
    """The network's largest stride."""
    task: str
    """Always ``detect``."""
    dynamic: bool
    """True when the network takes any input height and width (rectangular letterbox)."""
    ncnn_dir: Path | None = None
    """A directory with the ncnn model of the head's raw outputs (``model.ncnn.param``/``.bin``),
    when the ONNX → ncnn conversion could run (``pnnx`` installed when the model was first seen)."""

    @property
    def openvino_xml(self) -> Path | None:
        """The IR's ``.xml`` inside :attr:`openvino_dir`."""
        if self.openvino_dir is None:
            return None
        return _find_xml(self.openvino_dir)


def resolve_model(settings: Settings) -> ResolvedModel:
    """Resolve ``settings.model`` (see the module docstring); raises :class:`ModelError`."""
    source = settings.model.expanduser()
    if not source.exists():
        raise ModelError(
            f"{env_name('model')}={settings.model}: no such file or directory "
            f"(working directory {Path.cwd()}); expected a YOLOv8 .pt, an .onnx file "
            "or an OpenVINO IR directory"
        )
    if source.is_dir() or source.suffix.lower() == ".xml":
        xml = _find_xml(source) if source.is_dir() else source
        if xml is None:
            raise ModelError(f"{source} is a directory without an OpenVINO IR (.xml + .bin)")
        meta = read_openvino_metadata(xml)
        digest = _sha256(xml, xml.with_suffix(".bin"))
        resolved = _resolved(source, digest, None, xml.parent, meta)
    elif source.suffix.lower() == ".onnx":
        meta = read_onnx_metadata(source)
        digest = _sha256(source)
        resolved = _resolved(source, digest, source, None, meta)
        resolved = _with_ncnn(resolved, source, settings.cache_path() / digest)
    elif source.suffix.lower() in (".pt", ".pth"):
        resolved = _from_checkpoint(source, settings.cache_path())
    else:
        raise ModelError(
            f"{env_name('model')}={source}: unknown model type "
            f"{source.suffix or '(no suffix)'!r}; "
            "expected a YOLOv8 .pt checkpoint, an .onnx file or an OpenVINO IR directory"
        )
    return _with_imgsz(resolved, settings.imgsz)


def _resolved(
    source: Path, digest: str, onnx: Path | None, ov_dir: Path | None, meta: ModelMetadata
) -> ResolvedModel:
    return ResolvedModel(
        source=source.resolve(),
        sha256=digest,
        onnx_path=onnx.resolve() if onnx else None,
        openvino_dir=ov_dir.resolve() if ov_dir else None,
        names=meta.names,
        imgsz=meta.imgsz,
        stride=meta.stride,
        task=meta.task,
        dynamic=meta.dynamic,
    )


def _with_imgsz(model: ResolvedModel, imgsz: int | None) -> ResolvedModel:
    """Apply ``INFERENCE_IMGSZ``, rounded up to a multiple of the stride as the reference does."""
    if imgsz is None:
        return model
    side = max(math.ceil(imgsz / model.stride) * model.stride, model.stride)
    if side != imgsz:
        log.warning(
            "%s=%d is not a multiple of stride %d; using %d",
            env_name("imgsz"),
            imgsz,
            model.stride,
            side,
        )
    if not model.dynamic and (side, side) != model.imgsz:
        raise ModelError(
            f"{env_name('imgsz')}={imgsz}: {model.source} has a fixed input of "
            f"{model.imgsz[0]}x{model.imgsz[1]}; unset {env_name('imgsz')} or export the model "
            "with dynamic axes"
        )
    return dataclasses.replace(model, imgsz=(side, side))


def _from_checkpoint(source: Path, cache: Path) -> ResolvedModel:
    digest = _sha256(source)
    entry = cache / digest
    if not (entry / METADATA_NAME).is_file():
        cache.mkdir(parents=True, exist_ok=True)
        with _exclusive(cache / f"{digest}.lock"):
            if not (entry / METADATA_NAME).is_file():
                _convert(source, entry, cache)
    meta = ModelMetadata.from_json((entry / METADATA_NAME).read_text())
    log.info("model %s (sha256 %s) from cache %s", source, digest[:12], entry)
    resolved = _resolved(source, digest, entry / "model.onnx", entry, meta)
    return _with_ncnn(resolved, entry / "model.onnx", entry)


def _with_ncnn(model: ResolvedModel, onnx: Path, entry: Path) -> ResolvedModel:
    """``model`` with the ncnn conversion of ``onnx`` in ``entry`` (made once, if it can be)."""
    if not (entry / NCNN_PARAM).is_file():
        if not ncnn_available():
            log.info("no ncnn conversion of %s: pnnx is not installed", model.source)
            return model
        entry.mkdir(parents=True, exist_ok=True)
        with _exclusive(entry.parent / f"{entry.name}.ncnn.lock"):
            if not (entry / NCNN_PARAM).is_file():
                try:
                    onnx_to_ncnn(onnx, entry)
                except ModelError as exc:  # OpenVINO and ONNX Runtime still run the model
                    log.warning("ncnn runtime unavailable for %s: %s", model.source, exc)
                    return model
    if not (entry / NCNN_BIN).is_file():
        return model
    return dataclasses.replace(model, ncnn_dir=entry.resolve())


def _convert(source: Path, entry: Path, cache: Path) -> None:
    tmp = cache / f".tmp-{entry.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        onnx = export_onnx(source, tmp, config_dir=cache / "ultralytics")
        meta = read_onnx_metadata(onnx)
        onnx_to_openvino(onnx, tmp)
        (tmp / METADATA_NAME).write_text(meta.to_json())
        shutil.rmtree(entry, ignore_errors=True)  # an incomplete entry left by a crash
        tmp.rename(entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _find_xml(directory: Path) -> Path | None:
    preferred = directory / OPENVINO_NAME
    if preferred.is_file():
        return preferred
    candidates = sorted(p for p in directory.glob("*.xml") if p.with_suffix(".bin").is_file())
    return candidates[0] if candidates else None


def _sha256(*paths: Path) -> str:
    digest = hashlib.sha256()
    for path in paths:
        try:
            with path.open("rb") as handle:
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
        except OSError as exc:
            raise ModelError(f"cannot read {path}: {exc}") from None
    return digest.hexdigest()

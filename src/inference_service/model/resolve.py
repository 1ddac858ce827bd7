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
- A model directory made by ``inference-service export`` (:mod:`inference_service.model.manifest`)
  is used as it is: its files are checked against the manifest's sizes and sha256, nothing is
  converted, and its identity is the sha256 of the model it was made from. With
  ``INFERENCE_PRECISION=int8`` its own int8 IR is used when it has one.
- ``s3://bucket/key`` (an ``.onnx``, a ``.pt`` or a model directory's prefix) is first fetched into
  the cache (:mod:`inference_service.model.remote`, reused while unchanged), then resolved as the
  local copy.
- With ``INFERENCE_PRECISION=int8`` the model (from any of the above) is also quantized once
  (:mod:`inference_service.model.quantize`, on :mod:`inference_service.model.calibration`'s frames)
  into ``<cache_dir>/<sha256>/int8-<key>/``, where ``key`` hashes the model's sha256, the
  calibration source's content fingerprint (the chosen files' bytes, the video's bytes or the
  objects' keys, ETags and sizes, with the settings that choose them; nothing is decoded when the
  entry exists), the input shaping (imgsz, stride, dynamic axes) and the quantization recipe; an
  OpenVINO IR that is already quantized is used as it is.

Anything that is not a YOLOv8 detection model is refused with a :class:`ModelError` that names what
was found and what is expected.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from inference_service.errors import ConfigError, ModelError
from inference_service.model.calibration import load_calibration, locate_calibration
from inference_service.model.export import (
    INSTALL_HINT,
    NCNN_BIN,
    NCNN_PARAM,
    OPENVINO_NAME,
    export_available,
    export_onnx,
    ncnn_available,
    onnx_to_ncnn,
    onnx_to_openvino,
)
from inference_service.model.locking import exclusive
from inference_service.model.manifest import is_model_directory, read_manifest, verify_directory
from inference_service.model.metadata import (
    ModelMetadata,
    read_onnx_metadata,
    read_openvino_metadata,
    write_ir_metadata,
)
from inference_service.model.quantize import RECIPE, REPORT_NAME, quantize
from inference_service.model.remote import cached_copy, fetch, open_reader
from inference_service.model.source import is_remote, remote_location
from inference_service.runtime.openvino_backend import is_quantized
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
    int8_dir: Path | None = None
    """The directory of the int8 OpenVINO IR (``INFERENCE_PRECISION=int8`` only)."""

    @property
    def openvino_xml(self) -> Path | None:
        """The IR's ``.xml`` inside :attr:`openvino_dir`."""
        if self.openvino_dir is None:
            return None
        return _find_xml(self.openvino_dir)

    @property
    def int8_xml(self) -> Path | None:
        """The int8 IR's ``.xml`` inside :attr:`int8_dir`."""
        if self.int8_dir is None:
            return None
        return _find_xml(self.int8_dir)


def resolve_model(settings: Settings) -> ResolvedModel:
    """Resolve ``settings.model`` (see the module docstring); raises :class:`ModelError`."""
    local = None if is_remote(settings.model) else Path(settings.model).expanduser()
    source = local if local is not None else _fetched(settings)
    if not source.exists():
        raise ModelError(
            f"{env_name('model')}={settings.model}: no such file or directory "
            f"(working directory {Path.cwd()}); expected a YOLOv8 .pt, an .onnx file, "
            "an OpenVINO IR directory or a model directory made by `inference-service export`"
        )
    if is_model_directory(source):
        resolved = _from_model_directory(source)
        resolved = _with_imgsz(resolved, settings.imgsz)
        if settings.precision == "int8":
            resolved = _directory_int8(resolved, source, settings)
        return resolved
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
    resolved = _with_imgsz(resolved, settings.imgsz)
    if settings.precision == "int8":
        resolved = _with_int8(resolved, settings)
    return resolved


def _fetched(settings: Settings) -> Path:
    """The local copy of the configured ``s3://`` model (downloaded once, then reused)."""
    location = remote_location(settings)
    reader = open_reader(settings, location.bucket)
    if location.suffix in (".pt", ".pth") and not export_available():
        # Without the export extra a checkpoint serves only if its conversion is cached already.
        cached = cached_copy(settings, location, reader)
        entry = None if cached is None else settings.cache_path() / _sha256(cached)
        if entry is None or not (entry / METADATA_NAME).is_file():
            raise ModelError(
                f"{env_name('model')}={location.uri} is a PyTorch checkpoint; converting it needs "
                f"ultralytics and torch: {INSTALL_HINT} (or upload a model directory made by "
                "`inference-service export`, or an .onnx file, and name that)"
            )
    return fetch(settings, location, reader).path


def _from_model_directory(directory: Path) -> ResolvedModel:
    """A model directory made by ``export``: its files as they are, verified, no conversion."""
    manifest = read_manifest(directory)
    verify_directory(directory, manifest)
    onnx = manifest.file("onnx")
    xml = manifest.file("openvino")
    param = manifest.file("ncnn")
    resolved = _resolved(
        directory,
        manifest.source_sha256,
        directory / onnx if onnx else None,
        (directory / xml).parent if xml else None,
        manifest.metadata,
    )
    if param is not None and (directory / param).name == NCNN_PARAM:
        resolved = dataclasses.replace(resolved, ncnn_dir=(directory / param).parent.resolve())
    log.info(
        "model directory %s (source %s, sha256 %s): %s",
        directory,
        manifest.source_name,
        manifest.source_sha256[:12],
        ", ".join(f"{rt} {'/'.join(sorted(p))}" for rt, p in sorted(manifest.runtimes.items())),
    )
    return resolved


def _directory_int8(model: ResolvedModel, directory: Path, settings: Settings) -> ResolvedModel:
    """The directory's own int8 IR when it has one; else quantized into the cache as for any
    model (needs NNCF and ``INFERENCE_CALIBRATION``)."""
    xml = read_manifest(directory).file("openvino", "int8")
    if xml is None:
        log.info("int8: %s has no int8 model; quantizing it (once, cached)", directory)
        return _with_int8(model, settings)
    if settings.calibration is not None:
        log.info(
            "int8: %s has its own int8 model; %s is not used",
            directory,
            env_name("calibration"),
        )
    return dataclasses.replace(model, int8_dir=(directory / xml).parent.resolve())


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
        with exclusive(cache / f"{digest}.lock"):
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
        with contextlib.ExitStack() as held:
            try:
                entry.mkdir(parents=True, exist_ok=True)
                held.enter_context(exclusive(entry.parent / f"{entry.name}.ncnn.lock"))
            except OSError as exc:  # a read-only cache: OpenVINO and ONNX Runtime still run it
                log.warning("no ncnn conversion of %s: cache %s: %s", model.source, entry, exc)
                return model
            if not (entry / NCNN_PARAM).is_file():
                try:
                    onnx_to_ncnn(onnx, entry)
                except ModelError as exc:  # OpenVINO and ONNX Runtime still run the model
                    log.warning("ncnn runtime unavailable for %s: %s", model.source, exc)
                    return model
    if not (entry / NCNN_BIN).is_file():
        return model
    return dataclasses.replace(model, ncnn_dir=entry.resolve())


def int8_key(model: ResolvedModel, calibration_digest: str) -> str:
    """The cache key of ``model`` quantized on the calibration subset of content fingerprint
    ``calibration_digest`` (:func:`~inference_service.model.calibration.locate_calibration`)."""
    shaping = {
        "model_sha256": model.sha256,
        "calibration_sha256": calibration_digest,
        "imgsz": list(model.imgsz),
        "stride": model.stride,
        "dynamic": model.dynamic,
        "recipe": RECIPE,
    }
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]


def _with_int8(model: ResolvedModel, settings: Settings) -> ResolvedModel:
    """``model`` with its int8 IR: the model itself when it is quantized already, else the cached
    quantization on ``INFERENCE_CALIBRATION``'s frames (made once, under a lock)."""
    given = model.openvino_xml
    if given is not None and is_quantized(given):
        log.info("int8: %s is quantized already; used as it is", given)
        return dataclasses.replace(model, int8_dir=given.parent)
    source = given or model.onnx_path
    if source is None:  # resolve_model always finds one of the two
        raise ModelError(f"{model.source}: no OpenVINO IR or ONNX file to quantize")
    located = locate_calibration(settings)  # chosen and fingerprinted, not decoded
    cache = settings.cache_path()
    key = int8_key(model, located.digest)
    entry = cache / model.sha256 / f"int8-{key}"
    if not (entry / REPORT_NAME).is_file():
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            (entry.parent / f"int8-{key}.lock").touch()
        except OSError as exc:
            raise ConfigError(
                f"{env_name('precision')}=int8: cannot write the quantized model to {entry} "
                f"({exc.strerror or exc}); point {env_name('cache_dir')} at a writable "
                "directory, or quantize once where it is writable and ship the cache"
            ) from None
        with exclusive(entry.parent / f"int8-{key}.lock"):
            if not (entry / REPORT_NAME).is_file():
                tmp = entry.parent / f".tmp-int8-{key}-{os.getpid()}"
                shutil.rmtree(tmp, ignore_errors=True)
                try:
                    calibration = load_calibration(
                        settings, model.imgsz, model.stride, dynamic=model.dynamic, located=located
                    )
                    report = quantize(source, calibration, tmp)
                    write_ir_metadata(
                        tmp,
                        task=model.task,
                        names=model.names,
                        imgsz=model.imgsz,
                        stride=model.stride,
                    )
                    shutil.rmtree(entry, ignore_errors=True)  # an incomplete entry of a crash
                    tmp.rename(entry)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
                log.info(
                    "int8: quantized in %.0f s (%d FakeQuantize, %d head layers kept in float)",
                    report.get("seconds", 0.0),
                    report.get("fake_quantize", 0),
                    report.get("float_head_layers", 0),
                )
    log.info("int8: %s (key %s) from cache %s", model.source.name, key, entry)
    return dataclasses.replace(model, int8_dir=entry.resolve())


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

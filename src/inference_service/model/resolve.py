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
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from inference_service.errors import ConfigError, ModelError
from inference_service.model.calibration import load_calibration, locate_calibration
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
from inference_service.model.quantize import RECIPE, REPORT_NAME, quantize
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
    resolved = _with_imgsz(resolved, settings.imgsz)
    if settings.precision == "int8":
        resolved = _with_int8(resolved, settings)
    return resolved


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
        with contextlib.ExitStack() as held:
            try:
                entry.mkdir(parents=True, exist_ok=True)
                held.enter_context(_exclusive(entry.parent / f"{entry.name}.ncnn.lock"))
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
        with _exclusive(entry.parent / f"int8-{key}.lock"):
            if not (entry / REPORT_NAME).is_file():
                tmp = entry.parent / f".tmp-int8-{key}-{os.getpid()}"
                shutil.rmtree(tmp, ignore_errors=True)
                try:
                    calibration = load_calibration(
                        settings, model.imgsz, model.stride, dynamic=model.dynamic, located=located
                    )
                    report = quantize(source, calibration, tmp)
                    _write_ir_metadata(tmp, model)
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


def _write_ir_metadata(directory: Path, model: ResolvedModel) -> None:
    """``metadata.yaml`` beside an IR, as ultralytics writes it (JSON is YAML), so that the
    directory is a model of its own (``INFERENCE_MODEL`` may name the int8 directory)."""
    meta = {
        "task": model.task,
        "names": dict(enumerate(model.names)),
        "imgsz": list(model.imgsz),
        "stride": model.stride,
    }
    (directory / "metadata.yaml").write_text(json.dumps(meta, indent=2) + "\n")


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

"""Make a model directory (:mod:`inference_service.model.manifest`) from a ``.pt`` or an ``.onnx``:
what ``inference-service export`` runs.

Every conversion a runtime needs is made here once (ONNX from a ``.pt`` in a child process with
ultralytics, OpenVINO IR, ncnn where pnnx is installed, int8 on request with NNCF), so that the
directory serves anywhere with the serving dependencies alone. The directory is built beside its
destination and renamed into place when complete, the manifest written last.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from inference_service.errors import ConfigError, ModelError
from inference_service.model.calibration import load_calibration, locate_calibration
from inference_service.model.export import (
    NCNN_PARAM,
    ONNX_NAME,
    OPENVINO_NAME,
    export_onnx,
    ncnn_available,
    onnx_to_ncnn,
    onnx_to_openvino,
)
from inference_service.model.manifest import (
    MANIFEST_NAME,
    Manifest,
    describe_files,
    file_sha256,
)
from inference_service.model.metadata import ModelMetadata, read_onnx_metadata, write_ir_metadata
from inference_service.model.quantize import INT8_NAME, RECIPE, REPORT_NAME, quantize

if TYPE_CHECKING:
    from inference_service.settings import Settings

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "int8")
OPENVINO_DIR = "openvino"
INT8_DIR = "int8"
NCNN_DIR = "ncnn"
_TOOLS = {
    "always": ("kafka-yolo-detector", "onnxruntime", "openvino"),
    "pt": ("ultralytics", "torch", "onnx", "onnxslim"),
    "ncnn": ("pnnx", "onnx"),
    "int8": ("nncf",),
}
"""The distributions whose versions a manifest records, by the step that used them."""


def export_directory(
    source: Path,
    out: Path,
    settings: Settings,
    *,
    precisions: Sequence[str] = ("fp32",),
    imgsz: int | None = None,
    force: bool = False,
    step: Callable[[str], None] = log.info,
) -> Manifest:
    """Convert ``source`` (``.pt``, ``.pth`` or ``.onnx``) into the model directory ``out``.

    ``precisions``: fp32 is always made (the ONNX and OpenVINO IR; bf16 is served from the same
    IR, a runtime hint); int8 adds an NNCF-quantized IR calibrated on ``settings.calibration``.
    ``imgsz``: the nominal inference size recorded (rounded up to the stride; a model with a
    fixed input must already have it). ``step`` receives one line per stage (progress).

    Raises :class:`ConfigError` for a destination that is a file or a non-empty directory
    (without ``force``), :class:`ModelError` for a source that is not a YOLOv8 detection model or
    a conversion that fails (naming the extra to install when one is missing).
    """
    unknown = sorted(set(precisions) - set(PRECISIONS))
    if unknown:
        raise ConfigError(f"unknown precision {', '.join(unknown)}; expected {PRECISIONS}")
    suffix = source.suffix.lower()
    if not source.is_file():
        raise ConfigError(f"{source}: no such file (working directory {Path.cwd()})")
    if suffix not in (".pt", ".pth", ".onnx"):
        raise ConfigError(
            f"{source}: unknown model type {suffix or '(no suffix)'!r}; expected a YOLOv8 .pt "
            "checkpoint or an .onnx file"
        )
    _check_destination(out, force=force)
    started = time.monotonic()
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tools = list(_TOOLS["always"])
    extra: dict[str, Any] = {}
    try:
        tmp.mkdir(parents=True)
        onnx = tmp / ONNX_NAME
        if suffix == ".onnx":
            step(f"checking {source}")
            shutil.copyfile(source, onnx)
        else:
            step(f"converting {source} to ONNX (ultralytics, in a child process)")
            export_onnx(source, tmp, config_dir=settings.cache_path() / "ultralytics", imgsz=imgsz)
            tools += _TOOLS["pt"]
        meta = _with_imgsz(read_onnx_metadata(onnx), imgsz, source)
        runtimes: dict[str, dict[str, str]] = {"onnx": {"fp32": ONNX_NAME}}

        step("converting ONNX to OpenVINO IR (fp32)")
        (tmp / OPENVINO_DIR).mkdir()
        onnx_to_openvino(onnx, tmp / OPENVINO_DIR)
        _ir_metadata(tmp / OPENVINO_DIR, meta)
        ir = f"{OPENVINO_DIR}/{OPENVINO_NAME}"
        runtimes["openvino"] = {"fp32": ir, "bf16": ir}

        if ncnn_available():
            step("converting ONNX to ncnn (pnnx)")
            try:
                onnx_to_ncnn(onnx, tmp / NCNN_DIR)
                runtimes["ncnn"] = {"fp32": f"{NCNN_DIR}/{NCNN_PARAM}"}
                tools += _TOOLS["ncnn"]
            except ModelError as exc:  # OpenVINO and ONNX Runtime still serve the directory
                log.warning("no ncnn model in %s: %s", out, exc)
                shutil.rmtree(tmp / NCNN_DIR, ignore_errors=True)
        else:
            log.warning("no ncnn model in %s: pnnx is not installed (the export extra)", out)

        if "int8" in precisions:
            step(f"quantizing to int8 on the frames of {settings.calibration}")
            located = locate_calibration(settings)
            calibration = load_calibration(
                settings, meta.imgsz, meta.stride, dynamic=meta.dynamic, located=located
            )
            report = quantize(tmp / OPENVINO_DIR / OPENVINO_NAME, calibration, tmp / INT8_DIR)
            _ir_metadata(tmp / INT8_DIR, meta)
            runtimes["openvino"]["int8"] = f"{INT8_DIR}/{INT8_NAME}"
            tools += _TOOLS["int8"]
            extra["int8"] = {
                "calibration": settings.calibration,
                "calibration_frames": len(calibration.inputs),
                "calibration_sha256": calibration.digest,
                "recipe": RECIPE,
                "report": f"{INT8_DIR}/{REPORT_NAME}",
                "seconds": report.get("seconds"),
            }

        step("hashing the files and writing the manifest")
        extra["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        manifest = Manifest(
            metadata=meta,
            source_name=source.name,
            source_sha256=file_sha256(source),
            runtimes=runtimes,
            files=describe_files(tmp),
            tools=_versions(tools),
            extra=extra,
        )
        (tmp / MANIFEST_NAME).write_text(manifest.to_json())
        _replace(out, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    step(
        f"wrote {out} in {time.monotonic() - started:.0f} s: "
        + ", ".join(f"{rt} {'/'.join(p)}" for rt, p in manifest.runtimes.items())
    )
    return manifest


def _check_destination(out: Path, *, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConfigError(
            f"--out {out}: the directory is not empty; pass --force to replace it, or choose "
            "another directory"
        )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out {out}: cannot create {out.parent}: {exc.strerror}") from None


def _replace(out: Path, built: Path) -> None:
    """Move ``built`` to ``out``, replacing what is there (already checked or forced)."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.is_dir():
        out.rename(old)
    try:
        built.rename(out)
    except OSError:
        if old.exists():
            old.rename(out)  # leave the previous directory as it was
        raise
    shutil.rmtree(old, ignore_errors=True)


def _with_imgsz(meta: ModelMetadata, imgsz: int | None, source: Path) -> ModelMetadata:
    if imgsz is None:
        return meta
    side = max(math.ceil(imgsz / meta.stride) * meta.stride, meta.stride)
    if side != imgsz:
        log.warning("--imgsz %d is not a multiple of stride %d; using %d", imgsz, meta.stride, side)
    if not meta.dynamic and (side, side) != meta.imgsz:
        raise ModelError(
            f"--imgsz {imgsz}: {source} has a fixed input of {meta.imgsz[0]}x{meta.imgsz[1]}; "
            "drop --imgsz or export the model with dynamic axes"
        )
    return dataclasses.replace(meta, imgsz=(side, side))


def _versions(names: Sequence[str]) -> dict[str, str]:
    """Installed version of each distribution (read from its metadata: nothing is imported)."""
    out: dict[str, str] = {}
    for name in dict.fromkeys(names):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def _ir_metadata(directory: Path, meta: ModelMetadata) -> None:
    write_ir_metadata(directory, task=meta.task, names=meta.names, imgsz=meta.imgsz,
                      stride=meta.stride)  # fmt: skip

"""The model directory's ``manifest.json``: what ``inference-service export`` made, and the check
that a copy of the directory is complete and intact.

A model directory holds every conversion the runtimes need, so that it serves on any machine with
no conversion and no torch::

    manifest.json             written last: its presence marks the directory complete
    model.onnx                ONNX Runtime (and the source of every other conversion)
    openvino/model.xml|.bin   OpenVINO IR, fp32 weights (also serves bf16: a runtime hint)
    int8/model.xml|.bin       OpenVINO IR quantized to int8 (only when exported with int8)
    ncnn/model.ncnn.param|bin the ncnn model of the head's raw outputs (where pnnx was installed)

The manifest records the network's facts (class names, input size, stride, task), the source
file's name and sha256 (the model's identity: a directory reports the sha256 of the ``.pt`` or
``.onnx`` it was made from), the versions of the tools that made it, which file serves each
runtime and precision, and the size and sha256 of every file.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from inference_service.errors import ModelError
from inference_service.model.metadata import ModelMetadata

MANIFEST_NAME = "manifest.json"
FORMAT = "inference-service-model"
FORMAT_VERSION = 1
"""Bumped when a reader of an older version could not serve the directory."""
RUNTIMES = ("onnx", "openvino", "ncnn")


@dataclass(frozen=True, slots=True)
class FileEntry:
    """One file of a model directory."""

    size: int
    sha256: str


@dataclass(frozen=True, slots=True)
class Manifest:
    """A model directory's ``manifest.json``."""

    metadata: ModelMetadata
    """Class names, input size, stride, task, dynamic axes."""
    source_name: str
    """File name of the model the directory was made from (``best.pt``)."""
    source_sha256: str
    """sha256 of that file: the model's identity (``model.sha256`` in results)."""
    runtimes: Mapping[str, Mapping[str, str]]
    """Runtime (``onnx``, ``openvino``, ``ncnn``) → precision → the file that serves it, relative
    to the directory (an OpenVINO or ncnn entry names the ``.xml``/``.param`` of its folder)."""
    files: Mapping[str, FileEntry]
    """Every file of the directory but the manifest, relative POSIX path → size and sha256."""
    tools: Mapping[str, str] = field(default_factory=dict)
    """Distribution → version, of the tools that made the directory."""
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Other facts (``int8``: the calibration and recipe; ``created``), kept as they are."""

    def file(self, runtime: str, precision: str = "fp32") -> str | None:
        """The file serving ``runtime`` at ``precision``, or None when the directory has none."""
        return self.runtimes.get(runtime, {}).get(precision)

    def to_json(self) -> str:
        body: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "task": self.metadata.task,
            "names": list(self.metadata.names),
            "imgsz": list(self.metadata.imgsz),
            "stride": self.metadata.stride,
            "dynamic": self.metadata.dynamic,
            "source": {"name": self.source_name, "sha256": self.source_sha256},
            "tools": dict(self.tools),
            "runtimes": {k: dict(v) for k, v in self.runtimes.items()},
            "files": {
                name: {"size": entry.size, "sha256": entry.sha256}
                for name, entry in sorted(self.files.items())
            },
        }
        body.update(self.extra)
        return json.dumps(body, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, where: Path | str) -> Manifest:
        """Parse a manifest; :class:`ModelError` naming ``where`` when it is not one."""
        try:
            raw = json.loads(text)
            if not isinstance(raw, dict) or raw.get("format") != FORMAT:
                raise ValueError(f"not an {FORMAT} manifest (its 'format' is not {FORMAT!r})")
            version = int(raw["format_version"])
            if version > FORMAT_VERSION:
                raise ModelError(
                    f"{where}: manifest format_version {version} is newer than this service reads "
                    f"({FORMAT_VERSION}); upgrade the service or export the model with this version"
                )
            metadata = ModelMetadata(
                names=tuple(str(n) for n in raw["names"]),
                imgsz=(int(raw["imgsz"][0]), int(raw["imgsz"][1])),
                stride=int(raw["stride"]),
                task=str(raw["task"]),
                dynamic=bool(raw["dynamic"]),
            )
            runtimes = {
                str(rt): {str(p): _relative(str(f)) for p, f in dict(by_precision).items()}
                for rt, by_precision in dict(raw["runtimes"]).items()
            }
            files = {
                _relative(str(name)): FileEntry(int(e["size"]), str(e["sha256"]))
                for name, e in dict(raw["files"]).items()
            }
            known = {
                "format", "format_version", "task", "names", "imgsz", "stride", "dynamic",
                "source", "tools", "runtimes", "files",
            }  # fmt: skip
            manifest = cls(
                metadata=metadata,
                source_name=str(raw["source"]["name"]),
                source_sha256=str(raw["source"]["sha256"]),
                runtimes=runtimes,
                files=files,
                tools={str(k): str(v) for k, v in dict(raw.get("tools", {})).items()},
                extra={k: v for k, v in raw.items() if k not in known},
            )
        except ModelError:
            raise
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            detail = exc if isinstance(exc, ValueError) else f"missing or malformed {exc}"
            raise ModelError(f"{where}: not a readable model manifest: {detail}") from None
        if metadata.task != "detect":
            raise ModelError(f"{where}: a {metadata.task!r} model; only 'detect' is served")
        for runtime, by_precision in runtimes.items():
            for precision, name in by_precision.items():
                if name not in files:
                    raise ModelError(
                        f"{where}: runtimes.{runtime}.{precision} names {name}, which is not "
                        "among its files"
                    )
        if manifest.file("onnx") is None and manifest.file("openvino") is None:
            raise ModelError(f"{where}: names neither an ONNX nor an OpenVINO fp32 model")
        return manifest


def _relative(name: str) -> str:
    """A manifest's file name, refused unless a plain relative path inside the directory."""
    path = PurePosixPath(name)
    if not name or path.is_absolute() or ".." in path.parts or "\\" in name:
        raise ValueError(f"file name {name!r} is not a relative path inside the directory")
    return str(path)


def is_model_directory(path: Path) -> bool:
    """True when ``path`` is a directory with a ``manifest.json`` (made by ``export``)."""
    return (path / MANIFEST_NAME).is_file()


def read_manifest(directory: Path) -> Manifest:
    """The manifest of ``directory``; :class:`ModelError` when missing or unreadable."""
    path = directory / MANIFEST_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {exc.strerror or exc}") from None
    return Manifest.from_json(text, path)


def verify_directory(directory: Path, manifest: Manifest) -> None:
    """Check that every file the manifest lists is there with its size and sha256.

    Raises :class:`ModelError` naming the first missing, truncated or altered file.
    """
    for name, entry in sorted(manifest.files.items()):
        path = directory / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise ModelError(
                f"{directory}: {name} is missing (listed in {MANIFEST_NAME}); the directory is "
                "incomplete: copy it again, or export the model again"
            ) from None
        except OSError as exc:
            raise ModelError(f"cannot read {path}: {exc.strerror or exc}") from None
        if size != entry.size:
            raise ModelError(
                f"{path}: {size} bytes, {MANIFEST_NAME} says {entry.size}: the file is truncated "
                "or replaced; copy the directory again, or export the model again"
            )
        digest = file_sha256(path)
        if digest != entry.sha256:
            raise ModelError(
                f"{path}: sha256 {digest[:12]}…, {MANIFEST_NAME} says {entry.sha256[:12]}…: the "
                "file is corrupt or replaced; copy the directory again, or export the model again"
            )


def describe_files(directory: Path) -> dict[str, FileEntry]:
    """Size and sha256 of every file under ``directory`` but the manifest, by relative path."""
    out: dict[str, FileEntry] = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        name = path.relative_to(directory).as_posix()
        if name != MANIFEST_NAME:
            out[name] = FileEntry(path.stat().st_size, file_sha256(path))
    return out


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes; :class:`ModelError` when it cannot be read."""
    try:
        with path.open("rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {exc.strerror or exc}") from None

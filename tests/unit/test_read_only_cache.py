"""A read-only cache directory (a pod's read-only root, the image's own cache) must not stop start-up.

``INFERENCE_RUNTIME=auto`` used to open a lock file in the cache directory and crashed every worker
with ``OSError: [Errno 30] Read-only file system``; it now measures without caching and says so
once. Model resolution reads a conversion the cache already holds without writing anything.
The directories are made read-only for real: a read-only bind mount as root, a mode of 0555
otherwise (root ignores modes; the test skips where neither can be had).
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from inference_service.model import resolve_model
from inference_service.model.metadata import read_onnx_metadata
from inference_service.model.resolve import METADATA_NAME, _sha256
from inference_service.runtime import select
from inference_service.runtime.base import ModelFiles
from inference_service.settings import Settings
from tests.unit.test_model_resolve import _tiny_onnx

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")

MakeReadOnly = Callable[[Path], None]


@pytest.fixture
def make_read_only() -> Iterator[MakeReadOnly]:
    """Turn a directory read-only for the rest of the test, for root as for anyone else."""
    mounted: list[Path] = []
    chmodded: list[Path] = []

    def apply(path: Path) -> None:
        if os.geteuid() != 0:
            path.chmod(0o555)
            chmodded.append(path)
        else:
            for args in (["--bind", path, path], ["-o", "remount,bind,ro", path]):
                done = subprocess.run(["mount", *map(str, args)], capture_output=True, text=True)
                if done.returncode != 0:
                    if mounted and mounted[-1] == path:
                        subprocess.run(["umount", str(path)], check=False)
                        mounted.pop()
                    pytest.skip(f"no read-only bind mount here: {done.stderr.strip()}")
                if args[0] == "--bind":
                    mounted.append(path)
        with pytest.raises(OSError) as refused:
            (path / "probe").write_text("x")
        assert refused.value.errno in (errno.EROFS, errno.EACCES)

    yield apply
    for path in reversed(mounted):
        subprocess.run(["umount", str(path)], check=False)
    for path in chmodded:
        path.chmod(0o755)


def _model(tmp_path: Path) -> ModelFiles:
    onnx = _tiny_onnx(tmp_path / "tiny.onnx")
    return ModelFiles(sha256=_sha256(onnx), onnx=onnx)


def _auto(model: ModelFiles, cache: Path) -> str:
    backend = select.open_backend(model, "auto", "fp32", 1, cache_dir=cache, probe_hw=(64, 64))
    try:
        return backend.name
    finally:
        backend.close()


def test_runtime_auto_measures_on_a_read_only_cache_and_says_so_once(
    tmp_path: Path, make_read_only: MakeReadOnly, caplog: pytest.LogCaptureFixture
) -> None:
    model = _model(tmp_path)
    cache = tmp_path / "cache"
    cache.mkdir()
    make_read_only(cache)
    select._warned_read_only.discard(cache)
    with caplog.at_level(logging.INFO, logger=select.__name__):
        first = _auto(model, cache)
        second = _auto(model, cache)
    assert first in ("openvino", "onnxruntime") and second in ("openvino", "onnxruntime")
    assert list(cache.iterdir()) == []
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "measuring at every start" in warnings[0].getMessage()
    assert "INFERENCE_CACHE_DIR" in warnings[0].getMessage()
    assert sum("median ms" in r.getMessage() for r in caplog.records) == 2  # measured twice


def test_runtime_auto_reads_a_choice_a_read_only_cache_already_holds(
    tmp_path: Path, make_read_only: MakeReadOnly, caplog: pytest.LogCaptureFixture
) -> None:
    model = _model(tmp_path)
    cache = tmp_path / "cache"
    chosen = _auto(model, cache)  # writable: measured and written
    assert (cache / select.CHOICE_FILE).is_file()
    make_read_only(cache)
    with caplog.at_level(logging.INFO, logger=select.__name__):
        assert _auto(model, cache) == chosen
    assert any("measured before" in r.getMessage() for r in caplog.records)


def test_resolve_reads_a_conversion_a_read_only_cache_holds(
    tmp_path: Path, make_read_only: MakeReadOnly
) -> None:
    """The image's case: /models/best.pt with its build-time conversion in a read-only cache."""
    checkpoint = tmp_path / "best.pt"
    checkpoint.write_bytes(b"a checkpoint converted at build time")
    cache = tmp_path / "cache"
    entry = cache / _sha256(checkpoint)
    entry.mkdir(parents=True)
    onnx = _tiny_onnx(entry / "model.onnx")
    (entry / METADATA_NAME).write_text(read_onnx_metadata(onnx).to_json())
    make_read_only(cache)
    resolved = resolve_model(Settings(model=checkpoint, cache_dir=cache))
    assert resolved.onnx_path == onnx.resolve()
    assert resolved.names == ("disc", "square")


def test_resolve_an_onnx_file_with_a_read_only_cache(
    tmp_path: Path, make_read_only: MakeReadOnly
) -> None:
    """A mounted .onnx: runs without writing its ncnn conversion anywhere."""
    onnx = _tiny_onnx(tmp_path / "mounted.onnx")
    cache = tmp_path / "cache"
    cache.mkdir()
    make_read_only(cache)
    resolved = resolve_model(Settings(model=onnx, cache_dir=cache))
    assert resolved.onnx_path == onnx.resolve() and resolved.ncnn_dir is None
    assert list(cache.iterdir()) == []

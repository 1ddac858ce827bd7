"""Model directories (``export``), their manifest and verification, and ``s3://`` models fetched
through a fake bucket: URI parsing, cache reuse, versions, errors. The networks are tiny ONNX
graphs (no ultralytics, no torch); the real model and the real S3 are in tests/model and
tests/integration."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from inference_service.cli import main as cli_main
from inference_service.errors import ConfigError, ModelError
from inference_service.model import resolve as resolve_module
from inference_service.model import resolve_model
from inference_service.model.directory import export_directory
from inference_service.model.manifest import MANIFEST_NAME, Manifest, read_manifest
from inference_service.model.remote import (
    KEEP_VERSIONS,
    ObjectInfo,
    RemoteDeniedError,
    RemoteMissingError,
    S3Location,
    fetch,
    location_root,
    parse_s3_uri,
)
from inference_service.model.source import is_remote, model_version
from inference_service.settings import Settings, load_settings
from tests.unit.test_model_resolve import _tiny_onnx


class FakeBucket:
    """An :class:`~inference_service.model.remote.ObjectReader` over a dict, counting calls."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.etags: dict[str, str] = {}
        self.calls: Counter[str] = Counter()
        self.denied = False
        self.corrupt_in_transfer: set[str] = set()

    def put(self, key: str, data: bytes, *, etag: str | None = None) -> None:
        self.objects[key] = data
        self.etags[key] = etag or hashlib.md5(data, usedforsecurity=False).hexdigest()

    def upload_dir(self, directory: Path, prefix: str) -> None:
        for path in sorted(p for p in directory.rglob("*") if p.is_file()):
            self.put(prefix + path.relative_to(directory).as_posix(), path.read_bytes())

    def _check(self) -> None:
        if self.denied:
            raise RemoteDeniedError("403 AccessDenied")

    def head(self, key: str) -> ObjectInfo:
        self.calls["head"] += 1
        self._check()
        if key not in self.objects:
            raise RemoteMissingError(key)
        return ObjectInfo(key, len(self.objects[key]), self.etags[key])

    def list(self, prefix: str) -> list[ObjectInfo]:
        self.calls["list"] += 1
        self._check()
        return [
            ObjectInfo(k, len(v), self.etags[k])
            for k, v in sorted(self.objects.items())
            if k.startswith(prefix)
        ]

    def download(self, key: str, dest: Path) -> str:
        self.calls["get"] += 1
        self._check()
        if key not in self.objects:
            raise RemoteMissingError(key)
        data = self.objects[key]
        if key in self.corrupt_in_transfer:  # a different byte each time, as noise would be
            data = bytes([data[0] ^ (self.calls["get"] % 255 + 1)]) + data[1:]
        dest.write_bytes(data)
        return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _settings(model: str | Path, tmp_path: Path, **kw: Any) -> Settings:
    return Settings(model=model, cache_dir=tmp_path / "cache", **kw)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A model directory exported from a tiny ONNX network."""
    onnx = _tiny_onnx(tmp_path / "tiny.onnx")
    out = tmp_path / "exported"
    export_directory(onnx, out, _settings(onnx, tmp_path / "export"))
    return out


# --- URIs and settings -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "bucket", "key", "directory"),
    [
        ("s3://models/yolo/best.onnx", "models", "yolo/best.onnx", False),
        ("s3://models/yolo/best.PT", "models", "yolo/best.PT", False),
        ("s3://models/yolo/v3/", "models", "yolo/v3/", True),
        ("s3://models/yolo/v3", "models", "yolo/v3/", True),  # no model suffix: a prefix
        ("s3://models", "models", "", True),
        ("s3://models/", "models", "", True),
    ],
)
def test_s3_uris(uri: str, bucket: str, key: str, directory: bool) -> None:
    location = parse_s3_uri(uri)
    assert (location.bucket, location.key, location.is_directory) == (bucket, key, directory)


@pytest.mark.parametrize("uri", ["s3://Bad_Bucket/x.onnx", "s3:///x.onnx", "s3://ab/x.onnx"])
def test_s3_uri_with_a_bad_bucket_is_refused(uri: str) -> None:
    with pytest.raises(ModelError, match="INFERENCE_MODEL"):
        parse_s3_uri(uri)


def test_s3_uri_with_dot_dot_is_refused() -> None:
    with pytest.raises(ModelError, match=r"'\.\.'"):
        parse_s3_uri("s3://models/a/../b.onnx")


def test_settings_keep_an_s3_uri_and_local_paths_as_given() -> None:
    assert Settings(model="s3://models/yolo/v3/").model == "s3://models/yolo/v3/"
    assert Settings(model=" s3://models/a.onnx ").model == "s3://models/a.onnx"
    # Detector.from_model passes a Path, which folds "//": the URI is restored.
    assert Settings(model=Path("s3://models/a.onnx")).model == "s3://models/a.onnx"
    assert Settings(model="models/test/best.pt").model == Path("models/test/best.pt")
    assert Settings(model=Path("x.onnx")).model == Path("x.onnx")
    assert Settings().model == Path("best.pt")
    with pytest.raises(ConfigError, match=r"INFERENCE_MODEL.*not an S3 bucket name"):
        load_settings({"model": "s3://No_Such/x.onnx"})


def test_is_remote() -> None:
    assert is_remote("s3://models/a.onnx")
    assert is_remote(Path("s3://models/a.onnx"))  # what a Path makes of it: s3:/models/a.onnx
    assert not is_remote("models/a.onnx")
    assert not is_remote(Path("best.pt"))


# --- the manifest and the directory ----------------------------------------------------------


def test_exported_directory_serves_as_it_is(model_dir: Path, tmp_path: Path) -> None:
    manifest = read_manifest(model_dir)
    source_sha = hashlib.sha256((tmp_path / "tiny.onnx").read_bytes()).hexdigest()
    assert manifest.source_name == "tiny.onnx" and manifest.source_sha256 == source_sha
    assert manifest.file("onnx") == "model.onnx"
    assert manifest.file("openvino") == manifest.file("openvino", "bf16") == "openvino/model.xml"
    assert "int8" not in manifest.runtimes["openvino"]
    assert {"kafka-yolo-detector", "openvino", "onnxruntime"} <= set(manifest.tools)
    assert set(manifest.files) >= {"model.onnx", "openvino/model.xml", "openvino/model.bin"}
    cache = tmp_path / "serve-cache"
    resolved = resolve_model(Settings(model=model_dir, cache_dir=cache))
    assert resolved.sha256 == source_sha  # the identity of the model it was made from
    assert resolved.onnx_path == (model_dir / "model.onnx").resolve()
    assert resolved.openvino_dir == (model_dir / "openvino").resolve()
    assert resolved.names == ("disc", "square") and resolved.imgsz == (320, 320)
    assert not cache.exists(), "a model directory needs no conversion and no cache"


def test_a_damaged_directory_names_the_file(model_dir: Path, tmp_path: Path) -> None:
    bin_path = model_dir / "openvino" / "model.bin"
    data = bytearray(bin_path.read_bytes())
    data[-1] ^= 0xFF
    bin_path.write_bytes(bytes(data))
    with pytest.raises(ModelError, match=r"openvino/model\.bin: sha256 .* corrupt"):
        resolve_model(_settings(model_dir, tmp_path))
    bin_path.write_bytes(bytes(data[:-10]))
    with pytest.raises(ModelError, match=r"openvino/model\.bin: \d+ bytes, manifest.json says"):
        resolve_model(_settings(model_dir, tmp_path))
    bin_path.unlink()
    with pytest.raises(ModelError, match=r"openvino/model\.bin is missing.*incomplete"):
        resolve_model(_settings(model_dir, tmp_path))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.update(format="other"), "not an inference-service-model manifest"),
        (lambda m: m.update(format_version=99), "format_version 99 is newer"),
        (lambda m: m.pop("names"), "missing or malformed 'names'"),
        (lambda m: m["files"].update({"../escape": {"size": 1, "sha256": "0"}}), "relative path"),
        (lambda m: m["runtimes"]["onnx"].update(fp32="nope.onnx"), "nope.onnx, which is not"),
        (lambda m: m.update(task="segment"), "'segment' model"),
    ],
)
def test_a_bad_manifest_is_refused(model_dir: Path, edit: Any, message: str) -> None:
    path = model_dir / MANIFEST_NAME
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))
    with pytest.raises(ModelError, match=message):
        read_manifest(model_dir)


def test_manifest_round_trip(model_dir: Path) -> None:
    manifest = read_manifest(model_dir)
    again = Manifest.from_json(manifest.to_json(), "x")
    assert again == manifest


def test_export_refuses_a_non_empty_directory_unless_forced(tmp_path: Path) -> None:
    onnx = _tiny_onnx(tmp_path / "tiny.onnx")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    settings = _settings(onnx, tmp_path)
    with pytest.raises(ConfigError, match="not empty; pass --force"):
        export_directory(onnx, out, settings)
    assert (out / "keep.txt").read_text() == "mine"
    export_directory(onnx, out, settings, force=True)
    assert not (out / "keep.txt").exists() and (out / MANIFEST_NAME).is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_export_records_imgsz_and_refuses_it_for_a_fixed_input(tmp_path: Path) -> None:
    dynamic = _tiny_onnx(tmp_path / "dynamic.onnx")
    manifest = export_directory(dynamic, tmp_path / "d", _settings(dynamic, tmp_path), imgsz=600)
    assert manifest.metadata.imgsz == (608, 608)  # rounded up to the stride
    fixed = _tiny_onnx(tmp_path / "fixed.onnx", dynamic=False)
    with pytest.raises(ModelError, match="fixed input of 320x320"):
        export_directory(fixed, tmp_path / "f", _settings(fixed, tmp_path), imgsz=640)
    assert not (tmp_path / "f").exists()


def test_export_refuses_what_is_not_a_detector(tmp_path: Path) -> None:
    seg = _tiny_onnx(tmp_path / "seg.onnx", task="segment")
    with pytest.raises(ModelError, match="'segment' model"):
        export_directory(seg, tmp_path / "out", _settings(seg, tmp_path))
    assert not (tmp_path / "out").exists()


def test_export_command_exit_codes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INFERENCE_CACHE_DIR", str(tmp_path / "cache"))
    onnx = _tiny_onnx(tmp_path / "tiny.onnx")
    out = tmp_path / "cli-out"
    assert cli_main(["export", str(onnx), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert cli_main(["export", str(onnx), "--out", str(out)]) == 2
    assert "not empty; pass --force" in capsys.readouterr().err
    assert cli_main(["export", str(tmp_path / "model.tflite"), "--out", str(tmp_path / "x")]) == 2
    assert cli_main(["export", str(onnx), "--out", str(tmp_path / "y"), "--precision", "int8"]) == 2
    assert "--precision int8 needs frames to calibrate on" in capsys.readouterr().err


# --- S3 ----------------------------------------------------------------------------------------


def test_an_s3_object_is_downloaded_once_and_reused(tmp_path: Path) -> None:
    bucket = FakeBucket()
    onnx = _tiny_onnx(tmp_path / "tiny.onnx")
    bucket.put("yolo/best.onnx", onnx.read_bytes())
    settings = _settings("s3://models/yolo/best.onnx", tmp_path)
    location = parse_s3_uri("s3://models/yolo/best.onnx")
    first = fetch(settings, location, bucket)
    assert first.downloaded and first.path.read_bytes() == onnx.read_bytes()
    assert bucket.calls == {"head": 1, "get": 1}
    again = fetch(settings, location, bucket)
    assert not again.downloaded and again.path == first.path
    assert bucket.calls == {"head": 2, "get": 1}, "reused: one HEAD, no GET"


def test_a_changed_object_is_a_new_version_and_old_ones_are_pruned(tmp_path: Path) -> None:
    bucket = FakeBucket()
    settings = _settings("s3://models/m.onnx", tmp_path)
    location = parse_s3_uri("s3://models/m.onnx")
    paths = []
    for n in range(KEEP_VERSIONS + 2):
        bucket.put("m.onnx", f"version {n}".encode())
        fetched = fetch(settings, location, bucket)
        assert fetched.downloaded
        paths.append(fetched.path)
    assert len(set(paths)) == len(paths)
    root = location_root(settings.cache_path(), location)
    kept = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert len(kept) == KEEP_VERSIONS
    assert paths[-1].read_bytes() == f"version {KEEP_VERSIONS + 1}".encode()
    assert paths[-2].is_file(), "the previous version stays for a process still serving it"
    assert not paths[0].exists()


def test_a_damaged_cached_copy_is_fetched_again(tmp_path: Path) -> None:
    bucket = FakeBucket()
    bucket.put("m.onnx", b"model bytes")
    settings = _settings("s3://models/m.onnx", tmp_path)
    location = parse_s3_uri("s3://models/m.onnx")
    path = fetch(settings, location, bucket).path
    path.write_bytes(b"model bytez")
    again = fetch(settings, location, bucket)
    assert again.downloaded and again.path.read_bytes() == b"model bytes"


def test_a_download_that_does_not_match_its_etag_is_refused(tmp_path: Path) -> None:
    bucket = FakeBucket()
    bucket.put("m.onnx", b"model bytes")
    bucket.corrupt_in_transfer.add("m.onnx")
    settings = _settings("s3://models/m.onnx", tmp_path)
    with pytest.raises(ModelError, match="does not match its ETag"):
        fetch(settings, parse_s3_uri("s3://models/m.onnx"), bucket)
    root = location_root(settings.cache_path(), parse_s3_uri("s3://models/m.onnx"))
    assert [p for p in root.iterdir() if p.is_dir()] == [], "nothing half-done is left"


def test_an_etag_that_is_not_the_md5_is_taken_when_two_downloads_agree(tmp_path: Path) -> None:
    """SSE-KMS and SSE-C objects have single-part ETags that are not their content's MD5."""
    bucket = FakeBucket()
    bucket.put("m.onnx", b"model bytes", etag="0123456789abcdef0123456789abcdef")
    settings = _settings("s3://models/m.onnx", tmp_path)
    fetched = fetch(settings, parse_s3_uri("s3://models/m.onnx"), bucket)
    assert fetched.path.read_bytes() == b"model bytes"
    assert bucket.calls["get"] == 2


def test_missing_and_denied_objects_name_bucket_key_and_credentials(tmp_path: Path) -> None:
    bucket = FakeBucket()
    settings = _settings("s3://models/yolo/best.onnx", tmp_path)
    location = parse_s3_uri("s3://models/yolo/best.onnx")
    with pytest.raises(ModelError, match=r"no such object or bucket.*'models'.*'yolo/best.onnx'"):
        fetch(settings, location, bucket)
    bucket.denied = True
    with pytest.raises(ModelError, match=r"access denied.*'models'.*AWS_ACCESS_KEY_ID"):
        fetch(settings, location, bucket)
    with pytest.raises(ModelError, match="no objects under the prefix 'v1/'"):
        fetch(settings, S3Location("models", "v1/"), FakeBucket())


def test_an_s3_model_directory_is_fetched_verified_and_reused(
    model_dir: Path, tmp_path: Path
) -> None:
    bucket = FakeBucket()
    bucket.upload_dir(model_dir, "yolo/v1/")
    bucket.put("yolo/v1/README.txt", b"not in the manifest: not downloaded")
    settings = _settings("s3://models/yolo/v1/", tmp_path)
    location = parse_s3_uri(str(settings.model))
    first = fetch(settings, location, bucket)
    files = len(read_manifest(model_dir).files)
    assert first.downloaded and bucket.calls == {"list": 1, "get": files + 1}
    assert not (first.path / "README.txt").exists()
    assert read_manifest(first.path) == read_manifest(model_dir)
    again = fetch(settings, location, bucket)
    assert not again.downloaded and again.path == first.path
    assert bucket.calls == {"list": 2, "get": files + 1}, "reused: one listing, no GET"


def test_an_incomplete_or_corrupt_s3_directory_is_refused(model_dir: Path, tmp_path: Path) -> None:
    settings = _settings("s3://models/v1/", tmp_path)
    partial = FakeBucket()
    partial.upload_dir(model_dir, "v1/")
    del partial.objects["v1/openvino/model.bin"]
    with pytest.raises(ModelError, match=r"openvino/model\.bin \(listed in manifest.json\) is not"):
        fetch(settings, parse_s3_uri("s3://models/v1/"), partial)
    corrupt = FakeBucket()
    corrupt.upload_dir(model_dir, "v1/")
    data = bytearray(corrupt.objects["v1/model.onnx"])
    data[-1] ^= 0xFF
    corrupt.put("v1/model.onnx", bytes(data), etag="abc-2")  # a multipart ETag: no MD5 check
    with pytest.raises(ModelError, match=r"model\.onnx: sha256 .* corrupt"):
        fetch(settings, parse_s3_uri("s3://models/v1/"), corrupt)
    no_manifest = FakeBucket()
    no_manifest.put("v1/model.onnx", b"x")
    with pytest.raises(ModelError, match=r"no manifest\.json under the prefix"):
        fetch(settings, parse_s3_uri("s3://models/v1/"), no_manifest)


def test_resolve_model_serves_an_s3_model_directory(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = FakeBucket()
    bucket.upload_dir(model_dir, "v1/")
    monkeypatch.setattr(resolve_module, "open_reader", lambda settings, name: bucket)
    resolved = resolve_model(_settings("s3://models/v1/", tmp_path))
    assert resolved.sha256 == read_manifest(model_dir).source_sha256
    assert resolved.onnx_path is not None and resolved.onnx_path.is_file()
    assert str(tmp_path / "cache" / "s3" / "models") in str(resolved.onnx_path)


def test_an_s3_checkpoint_without_the_export_extra_names_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = FakeBucket()
    bucket.put("best.pt", b"a checkpoint")
    monkeypatch.setattr(resolve_module, "open_reader", lambda settings, name: bucket)
    monkeypatch.setattr(resolve_module, "export_available", lambda: False)
    with pytest.raises(ModelError, match=r"s3://models/best\.pt is a PyTorch.*\[export\]"):
        resolve_model(_settings("s3://models/best.pt", tmp_path))
    assert bucket.calls["get"] == 0, "refused before downloading"


def test_model_version_is_cheap_and_follows_changes(model_dir: Path, tmp_path: Path) -> None:
    bucket = FakeBucket()
    bucket.put("m.onnx", b"one")
    remote = _settings("s3://models/m.onnx", tmp_path)
    first = model_version(remote, bucket)
    assert model_version(remote, bucket) == first
    bucket.put("m.onnx", b"two")
    assert model_version(remote, bucket) != first
    assert bucket.calls["get"] == 0, "a version downloads nothing"

    local = tmp_path / "m.onnx"
    local.write_bytes(b"one")
    before = model_version(_settings(local, tmp_path))
    os.utime(local, ns=(1, 1))
    assert model_version(_settings(local, tmp_path)) != before

    directory = _settings(model_dir, tmp_path)
    before = model_version(directory)
    manifest = model_dir / MANIFEST_NAME
    manifest.write_text(manifest.read_text().replace('"created"', '"created_"'))
    assert model_version(directory) != before
    shutil.rmtree(model_dir)
    with pytest.raises(ModelError, match="no such file"):
        model_version(directory)

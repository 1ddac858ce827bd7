"""int8's pure parts: calibration subsets and hashes, the cache key, the head's float scope, the
CPU features of the runtime choice, settings, the result's precision and the metrics of the bench."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import cv2
import jsonschema
import numpy as np
import pytest

from inference_devtools.detection_metrics import (
    Frame,
    agreement,
    average_precision,
    mean_average_precision,
)
from inference_service import schemas
from inference_service.domain import ModelInfo
from inference_service.errors import ConfigError
from inference_service.model import calibration as calibration_module
from inference_service.model.calibration import (
    MIN_FRAMES,
    digest_of,
    evenly_spaced,
    load_calibration,
    locate_calibration,
)
from inference_service.model.quantize import RECIPE, head_scope
from inference_service.model.resolve import ResolvedModel, int8_key
from inference_service.runtime import ModelFiles, cpu_features, open_backend
from inference_service.runtime.openvino_backend import COMPILED_CACHE, is_quantized
from inference_service.settings import Settings, load_settings
from inference_service.vision import letterbox_geometry, letterbox_image


def _jpegs(folder: Path, sizes: list[tuple[int, int]]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate(sizes):
        image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        path = folder / f"frame_{i:03d}.jpg"
        cv2.imwrite(str(path), image)
        paths.append(path)
    return paths


def _settings(tmp_path: Path, **kw: object) -> Settings:
    return Settings(cache_dir=tmp_path / "cache", precision="int8", **kw)  # type: ignore[arg-type]


# --- calibration subsets ------------------------------------------------------------------------


@pytest.mark.parametrize(("total", "count"), [(0, 5), (3, 5), (5, 5), (10, 3), (1000, 300), (7, 1)])
def test_evenly_spaced_is_ascending_distinct_and_bounded(total: int, count: int) -> None:
    chosen = evenly_spaced(total, count)
    assert chosen == sorted(set(chosen))
    assert len(chosen) == min(total, count)
    assert all(0 <= i < total for i in chosen)
    if chosen:
        assert chosen[0] == 0


def test_evenly_spaced_spreads_over_the_whole_range() -> None:
    assert evenly_spaced(100, 4) == [0, 25, 50, 75]


def test_digest_changes_with_pixels_and_shape() -> None:
    a = np.zeros((1, 32, 64, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0, 0] = 1
    assert digest_of([a]) == digest_of([a.copy()])
    assert digest_of([a]) != digest_of([b])
    assert digest_of([a]) != digest_of([a.reshape(1, 64, 32, 3)])
    assert digest_of([a, b]) != digest_of([b, a])


def test_folder_is_letterboxed_exactly_as_served(tmp_path: Path) -> None:
    paths = _jpegs(tmp_path / "frames", [(640, 360), (360, 640), (480, 480)])
    (tmp_path / "frames" / "notes.txt").write_text("not an image")
    s = _settings(tmp_path, calibration=str(tmp_path / "frames"), calibration_frames=8)
    calibration = load_calibration(s, (320, 320), 32, dynamic=True)
    assert len(calibration.inputs) == 3
    for path, got in zip(paths, calibration.inputs, strict=True):
        image = np.asarray(cv2.imread(str(path)), dtype=np.uint8)
        geo = letterbox_geometry(image.shape[:2], (320, 320), 32, auto=True)
        np.testing.assert_array_equal(got[0], letterbox_image(image, geo))
    assert [x.shape for x in calibration.inputs] == [
        (1, 192, 320, 3), (1, 320, 192, 3), (1, 320, 320, 3),
    ]  # fmt: skip
    again = load_calibration(s, (320, 320), 32, dynamic=True)
    assert again.digest == calibration.digest
    static = load_calibration(s, (320, 320), 32, dynamic=False)
    assert {x.shape for x in static.inputs} == {(1, 320, 320, 3)}
    assert static.digest != calibration.digest


def test_subset_takes_count_frames_of_the_first_ten_times_as_many(tmp_path: Path) -> None:
    _jpegs(tmp_path / "frames", [(64, 48)] * 25)
    s = _settings(tmp_path, calibration=str(tmp_path / "frames"), calibration_frames=2)
    calibration = load_calibration(s, (64, 64), 32, dynamic=True)
    assert len(calibration.inputs) == 2  # of frames 0..19: frames 0 and 10


def test_few_frames_warn_and_bad_files_are_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _jpegs(tmp_path / "frames", [(64, 48)] * 3)
    (tmp_path / "frames" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    s = _settings(tmp_path, calibration=str(tmp_path / "frames"))
    with caplog.at_level(logging.WARNING):
        calibration = load_calibration(s, (64, 64), 32, dynamic=True)
    assert len(calibration.inputs) == 3
    text = caplog.text
    assert "broken.jpg" in text
    assert f"only 3 calibration frames (at least {MIN_FRAMES}" in text
    assert "INFERENCE_CALIBRATION" in text


def test_video_frames(tmp_path: Path) -> None:
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 10, (96, 64))
    if not writer.isOpened():
        pytest.skip("this OpenCV build writes no MJPG video")
    rng = np.random.default_rng(1)
    for _ in range(12):
        writer.write(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8))
    writer.release()
    s = _settings(tmp_path, calibration=str(path), calibration_frames=4)
    calibration = load_calibration(s, (96, 96), 32, dynamic=True)
    assert len(calibration.inputs) == 4
    assert {x.shape for x in calibration.inputs} == {(1, 64, 96, 3)}


@pytest.mark.parametrize(
    ("calibration", "needle"),
    [
        (None, "INFERENCE_PRECISION=int8 needs frames to calibrate on: set INFERENCE_CALIBRATION"),
        ("/nonexistent/frames", "INFERENCE_CALIBRATION=/nonexistent/frames: no such file"),
        ("s3://", "expected s3://bucket/prefix/"),
    ],
)
def test_missing_calibration_names_the_setting(
    tmp_path: Path, calibration: str | None, needle: str
) -> None:
    s = _settings(tmp_path, calibration=calibration)
    with pytest.raises(ConfigError, match="INFERENCE_CALIBRATION") as info:
        load_calibration(s, (320, 320), 32, dynamic=True)
    assert needle in str(info.value)


def test_a_file_that_is_no_video_is_refused(tmp_path: Path) -> None:
    (tmp_path / "frames.txt").write_text("x")
    s = _settings(tmp_path, calibration=str(tmp_path / "frames.txt"))
    with pytest.raises(ConfigError, match=r"INFERENCE_CALIBRATION=.*not a folder, a video"):
        load_calibration(s, (320, 320), 32, dynamic=True)


def test_empty_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    s = _settings(tmp_path, calibration=str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="no readable frame"):
        load_calibration(s, (320, 320), 32, dynamic=True)


# --- the calibration fingerprint: content, not decoding ----------------------------------------


def test_folder_fingerprint_follows_the_chosen_bytes_without_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = _jpegs(tmp_path / "frames", [(64, 48)] * 25)
    s = _settings(tmp_path, calibration=str(tmp_path / "frames"), calibration_frames=2)

    def refuse(*_a: object, **_k: object) -> None:
        raise AssertionError("decoded a frame only to compute the cache key")

    monkeypatch.setattr(calibration_module, "decode_image", refuse)
    located = locate_calibration(s)
    assert located.kind == "folder"
    assert located.items == (str(paths[0]), str(paths[10]))  # of frames 0..19, evenly spaced
    assert locate_calibration(s).digest == located.digest
    (tmp_path / "frames" / "notes.txt").write_text("not an image")
    paths[5].write_bytes(paths[5].read_bytes() + b"\0")  # outside the chosen subset
    assert locate_calibration(s).digest == located.digest
    paths[10].write_bytes(paths[10].read_bytes() + b"\0")  # inside it
    changed = locate_calibration(s).digest
    assert changed != located.digest
    shaped = {
        locate_calibration(s.model_copy(update={"calibration_frames": 3})).digest,
        locate_calibration(s.model_copy(update={"max_frame_pixels": 10_000})).digest,
    }
    assert changed not in shaped and len(shaped) == 2


def test_the_located_subset_is_what_gets_decoded(tmp_path: Path) -> None:
    _jpegs(tmp_path / "frames", [(64, 48)] * 25)
    s = _settings(tmp_path, calibration=str(tmp_path / "frames"), calibration_frames=2)
    located = locate_calibration(s)
    decoded = load_calibration(s, (64, 64), 32, dynamic=True, located=located)
    assert decoded.inputs and len(decoded.inputs) == 2
    assert load_calibration(s, (64, 64), 32, dynamic=True).digest == decoded.digest


def test_video_fingerprint_is_the_file_content(tmp_path: Path) -> None:
    video = tmp_path / "clip.avi"
    video.write_bytes(b"not decoded to compute the key")
    s = _settings(tmp_path, calibration=str(video))
    first = locate_calibration(s)
    assert first.kind == "video" and first.items == (str(video),)
    video.write_bytes(b"other bytes, same name")
    assert locate_calibration(s).digest != first.digest


def test_s3_fingerprint_is_keys_etags_and_sizes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import obstore
    from obstore.store import MemoryStore

    from inference_service.adapters import s3

    store = MemoryStore()
    for i in range(4):
        obstore.put(store, f"frames/{i:03d}.jpg", b"x" * (10 + i))
    obstore.put(store, "frames/readme.txt", b"not an image")
    gets: list[str] = []
    real_get = obstore.get

    def get(store_: object, key: str) -> object:
        gets.append(key)
        return real_get(store_, key)  # type: ignore[arg-type]

    monkeypatch.setattr(s3, "open_store", lambda _settings, _bucket: store)
    monkeypatch.setattr(obstore, "get", get)
    s = _settings(tmp_path, calibration="s3://bucket/frames/", calibration_frames=2)
    first = locate_calibration(s)
    assert first.kind == "s3" and first.bucket == "bucket"
    assert first.items == ("frames/000.jpg", "frames/002.jpg") and gets == []
    assert locate_calibration(s).digest == first.digest
    obstore.put(store, "frames/002.jpg", b"y" * 12)  # same size, new ETag
    assert locate_calibration(s).digest != first.digest
    assert gets == []  # the key comes from the listing alone


# --- OpenVINO's compiled-model cache --------------------------------------------------------------


def test_openvino_imports_the_compiled_model_on_a_later_start(tmp_path: Path) -> None:
    pytest.importorskip("openvino")
    from inference_service.runtime.openvino_backend import OpenVinoBackend
    from tests.unit.test_model_resolve import _tiny_onnx

    onnx = _tiny_onnx(tmp_path / "tiny.onnx")
    cache = tmp_path / "cache"
    frame = np.zeros((1, 64, 64, 3), np.uint8)
    outputs = []
    for _ in range(2):
        backend = OpenVinoBackend(onnx, cache_dir=cache)
        outputs.append(backend.infer_images(frame))
        compiled = next(iter(backend._compiled.values())).model
        backend.close()
    assert list((cache / COMPILED_CACHE).glob("*.blob"))
    assert bool(compiled.get_property("LOADED_FROM_CACHE"))
    np.testing.assert_array_equal(outputs[0], outputs[1])


def test_openvino_runs_without_the_compiled_cache_when_it_cannot_write(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pytest.importorskip("openvino")
    from inference_service.runtime.openvino_backend import OpenVinoBackend
    from tests.unit.test_model_resolve import _tiny_onnx

    onnx = _tiny_onnx(tmp_path / "tiny.onnx")
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("x")  # no directory can be made under it, for root as for anyone
    with caplog.at_level(logging.DEBUG, logger="inference_service.runtime.openvino_backend"):
        backend = OpenVinoBackend(onnx, cache_dir=blocked)
        backend.infer_images(np.zeros((1, 64, 64, 3), np.uint8))
        backend.close()
    assert "compiled-model cache off" in caplog.text
    assert "CACHE_DIR" not in backend._config


# --- the cache key and the recipe -----------------------------------------------------------------


def _resolved(**kw: object) -> ResolvedModel:
    model = ResolvedModel(
        source=Path("/m/best.pt"), sha256="a" * 64, onnx_path=None, openvino_dir=Path("/m"),
        names=("disc",), imgsz=(320, 320), stride=32, task="detect", dynamic=True,
    )  # fmt: skip
    return dataclasses.replace(model, **kw)  # type: ignore[arg-type]


def test_int8_key_covers_model_calibration_and_shaping() -> None:
    key = int8_key(_resolved(), "c" * 64)
    assert key == int8_key(_resolved(), "c" * 64) and len(key) == 16
    others = {
        int8_key(_resolved(sha256="b" * 64), "c" * 64),
        int8_key(_resolved(), "d" * 64),
        int8_key(_resolved(imgsz=(640, 640)), "c" * 64),
        int8_key(_resolved(stride=64), "c" * 64),
        int8_key(_resolved(dynamic=False), "c" * 64),
    }
    assert key not in others and len(others) == 5
    assert RECIPE["preset"] == "mixed" and RECIPE["head"] == "float"


def test_head_scope_keeps_the_decode_in_float_and_quantizes_the_branches() -> None:
    import re

    names = [
        "/model.0/conv/Conv", "/model.21/cv2/conv/Conv", "/model.22/cv2.0/cv2.0.2/Conv",
        "/model.22/cv3.2/cv3.2.0/conv/Conv", "/model.22/dfl/Softmax", "/model.22/dfl/conv/Conv",
        "/model.22/Sub", "/model.22/Sigmoid", "/model.22/Concat_3",
    ]  # fmt: skip
    scope = head_scope(names)
    assert scope is not None
    floated = {n for n in names if re.match(scope, n)}
    assert floated == {
        "/model.22/dfl/Softmax", "/model.22/dfl/conv/Conv", "/model.22/Sub",
        "/model.22/Sigmoid", "/model.22/Concat_3",
    }  # fmt: skip
    assert head_scope(["/model.0/conv/Conv", "Add_1"]) is None


def test_is_quantized_reads_the_ir_text(tmp_path: Path) -> None:
    plain = tmp_path / "plain.xml"
    plain.write_text('<net><layers><layer id="0" type="Convolution"/></layers></net>')
    quantized = tmp_path / "q.xml"
    quantized.write_text('<net><layers>\n<layer id="1" type="FakeQuantize"/>\n</layers></net>')
    assert not is_quantized(plain) and is_quantized(quantized)
    assert not is_quantized(tmp_path / "missing.xml")
    assert not is_quantized(tmp_path / "model.onnx")


# --- runtime choice and settings -------------------------------------------------------------------


def test_cpu_features_name_the_instruction_sets_in_a_fixed_order() -> None:
    zen3 = "fpu sse avx avx2 fma bmi2"
    spr = "avx2 avx512f amx_int8 avx512_vnni amx_bf16 avx_vnni avx512_bf16 amx_tile"
    assert cpu_features(zen3) == "avx2"
    assert cpu_features(spr) == "avx2+avx512f+avx512_vnni+avx_vnni+avx512_bf16+amx_bf16+amx_int8"
    assert cpu_features("") == "none"
    assert cpu_features() != ""  # this machine's, read from /proc/cpuinfo where there is one


def test_int8_runs_on_openvino_only() -> None:
    assert load_settings({"precision": "int8", "runtime": "auto"}).precision == "int8"
    assert load_settings({"precision": "int8", "runtime": "openvino"}).runtime == "openvino"
    with pytest.raises(ConfigError, match="INFERENCE_PRECISION=int8 runs on OpenVINO only") as e:
        load_settings({"precision": "int8", "runtime": "onnxruntime"})
    assert "INFERENCE_RUNTIME" in str(e.value)
    with pytest.raises(ConfigError, match="INFERENCE_PRECISION"):
        load_settings({"precision": "int4"})
    with pytest.raises(ConfigError, match="INFERENCE_CALIBRATION_FRAMES"):
        load_settings({"calibration_frames": "0"})
    assert load_settings({"calibration": " "}).calibration is None


def test_int8_without_its_ir_names_the_calibration_setting() -> None:
    files = ModelFiles(sha256="a" * 64, openvino_xml=Path("/m/model.xml"))
    for runtime in ("auto", "openvino"):
        with pytest.raises(ConfigError, match="INFERENCE_CALIBRATION"):
            open_backend(files, runtime, "int8", 1)


# --- results say what ran ----------------------------------------------------------------------


def test_model_object_carries_the_precision_and_the_schema_takes_it() -> None:
    info = ModelInfo("best.pt", "0" * 64, (320, 320), 0.25, 0.45, "openvino/int8", (), "int8")
    assert info.to_dict()["precision"] == "int8"
    assert ModelInfo("m", "0" * 64, (1, 1), 0.1, 0.1, "x").to_dict()["precision"] == "fp32"
    model_schema = schemas.load("result")["properties"]["model"]
    jsonschema.validate(info.to_dict(), model_schema)
    older = {k: v for k, v in info.to_dict().items() if k != "precision"}
    jsonschema.validate(older, model_schema)  # additive: results without it stay valid
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**info.to_dict(), "precision": "int4"}, model_schema)


# --- the bench's accuracy metrics ---------------------------------------------------------------


def test_perfect_detections_score_one_and_misses_lower_it() -> None:
    truth = [Frame.of([[0, 0, 10, 10], [20, 20, 40, 40]], [0, 1])]
    perfect = [Frame.of([[0, 0, 10, 10], [20, 20, 40, 40]], [0, 1], [0.9, 0.8])]
    result = mean_average_precision(truth, perfect)
    assert result.map50 == pytest.approx(1.0) and result.map50_95 == pytest.approx(1.0)
    shifted = [Frame.of([[1, 1, 11, 11], [20, 20, 40, 40]], [0, 1], [0.9, 0.8])]
    partial = mean_average_precision(truth, shifted)
    assert partial.map50 == pytest.approx(1.0) and partial.map50_95 < 1.0
    wrong_class = [Frame.of([[0, 0, 10, 10]], [1], [0.9])]
    assert mean_average_precision(truth, wrong_class).map50 == pytest.approx(0.0)


def test_average_precision_of_half_recall() -> None:
    # One true positive, recall 0.5 at precision 1: the envelope is 1 up to 0.5, then 0.
    ap = average_precision(np.array([0.5]), np.array([1.0]))
    assert ap == pytest.approx(0.5, abs=0.01)


def test_agreement_matches_by_class_and_iou() -> None:
    ref = [Frame.of([[0, 0, 10, 10], [50, 50, 60, 60]], [0, 1], [0.9, 0.5])]
    cand = [Frame.of([[0, 0, 10, 11], [100, 100, 110, 110]], [0, 1], [0.85, 0.4])]
    a = agreement(ref, cand)
    assert (a.precision, a.recall, a.matched) == (0.5, 0.5, 1)
    assert a.max_box_deviation_px == pytest.approx(1.0)
    assert a.max_delta_conf == pytest.approx(0.05)
    assert agreement([Frame.of([], [])], [Frame.of([], [])]).precision == 1.0


def test_an_unwritable_cache_names_the_setting(tmp_path: Path) -> None:
    from inference_service.model import resolve

    (tmp_path / "ir").mkdir()
    (tmp_path / "ir" / "model.xml").write_text("<net/>")
    (tmp_path / "ir" / "model.bin").write_bytes(b"")
    _jpegs(tmp_path / "frames", [(64, 48)])
    (tmp_path / "not-a-dir").write_text("x")
    s = Settings(
        cache_dir=tmp_path / "not-a-dir", precision="int8", calibration=str(tmp_path / "frames")
    )
    model = _resolved(openvino_dir=tmp_path / "ir")
    with pytest.raises(ConfigError, match="INFERENCE_CACHE_DIR at a writable directory"):
        resolve._with_int8(model, s)

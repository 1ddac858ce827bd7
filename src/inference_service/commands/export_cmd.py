"""``inference-service export MODEL --out DIR``: a ``.pt`` or ``.onnx`` to a model directory.

The directory (ONNX, OpenVINO IR per precision, ncnn where pnnx is installed, ``manifest.json``)
serves anywhere with ``INFERENCE_MODEL=DIR`` (or uploaded to ``s3://bucket/prefix/``), with no
conversion and no torch. Converting a ``.pt`` needs the ``export`` extra; so does int8 (NNCF) and
ncnn (pnnx). Progress goes to stderr; the directory's path is printed on stdout when done.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from inference_service.errors import ConfigError
from inference_service.settings import load_settings


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, metavar="MODEL", help="a YOLOv8 .pt or an .onnx")
    parser.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="the model directory to write"
    )
    parser.add_argument(
        "--precision",
        nargs="+",
        choices=("fp32", "bf16", "int8"),
        default=["fp32"],
        help="precisions to provide: fp32 (always made; bf16 is served from the same IR), int8 "
        "(quantized with NNCF on --calibration's frames) [default: fp32]",
    )
    parser.add_argument(
        "--imgsz", type=int, default=None, help="nominal inference size (default: the model's own)"
    )
    parser.add_argument(
        "--calibration",
        default=None,
        metavar="SRC",
        help="int8: frames to calibrate on: a folder of images, a video, or s3://bucket/prefix/ "
        "[INFERENCE_CALIBRATION]",
    )
    parser.add_argument(
        "--calibration-frames",
        type=int,
        default=None,
        metavar="N",
        help="int8: how many frames calibrate [INFERENCE_CALIBRATION_FRAMES]",
    )
    parser.add_argument(
        "--force", action="store_true", help="replace DIR when it exists and is not empty"
    )


def run(args: argparse.Namespace) -> int:
    overrides = {"calibration": args.calibration, "calibration_frames": args.calibration_frames}
    settings = load_settings(overrides)
    if args.imgsz is not None and args.imgsz < 32:
        raise ConfigError(f"--imgsz {args.imgsz}: expected at least 32")
    if "int8" in args.precision and settings.calibration is None:
        raise ConfigError(
            "--precision int8 needs frames to calibrate on: pass --calibration with a folder of "
            "images, a video or s3://bucket/prefix/ (frames like those the service will see)"
        )
    from inference_service.model.directory import export_directory

    def step(message: str) -> None:
        print(f"export: {message}", file=sys.stderr, flush=True)

    # A ModelError (not a YOLOv8 detector, a missing extra) is a ConfigError: the CLI exits 2.
    export_directory(
        args.model,
        args.out,
        settings,
        precisions=args.precision,
        imgsz=args.imgsz,
        force=args.force,
        step=step,
    )
    print(args.out)
    return 0

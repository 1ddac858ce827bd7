"""Write the synthetic detection data set for the test model in ultralytics YOLO layout.

    .venv/bin/python scripts/make_dataset.py [--out data/synth] [--seed 20261128]
    .venv/bin/python scripts/make_dataset.py --conformance models/test/conformance
    .venv/bin/python scripts/make_dataset.py --photos tests/data/photos

The second form writes the 20 synthetic conformance frames (several sizes and aspect ratios,
shapes of 8-35 % of the short side, JPEG quality 85) and their ``labels.json``; the third
copies the real photos that installed packages ship (see `PHOTOS`), downscaled to at most
1280 px, half of them with synthetic shapes pasted on, plus ``labels.json`` (boxes of the
pasted shapes) and ``SOURCES.md``.

Layout under ``--out`` (gitignored): ``images/{train,val,test}/*.jpg``, ``labels/{train,val,test}/
*.txt`` (one ``class cx cy w h`` line per box, normalised), and ``data.yaml``. Each split draws from
its own child of ``numpy.random.SeedSequence(seed)``, so one seed reproduces every file. Frame sizes
cycle through 640x360, 480x480, 360x640 and 800x450; each image is saved as JPEG at a quality drawn
from 60-95; about 5 % of the images have no objects (background only). See
`inference_devtools.synthetic` for what a scene contains and how boxes are defined.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import cv2
import numpy as np
import numpy.typing as npt

from inference_devtools.synthetic import CLASS_NAMES, Box, paste_objects, render_scene

log = logging.getLogger(__name__)

SIZES: Final[tuple[tuple[int, int], ...]] = ((640, 360), (480, 480), (360, 640), (800, 450))
DEFAULT_SEED: Final[int] = 20261128
SPLITS: Final[tuple[str, ...]] = ("train", "val", "test")


def write_split(out: Path, split: str, count: int, rng: np.random.Generator) -> int:
    """Render `count` scenes into `out`/images/`split` and their labels; return the box count."""
    image_dir = out / "images" / split
    label_dir = out / "labels" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    n_boxes = 0
    for i in range(count):
        width, height = SIZES[i % len(SIZES)]
        n_objects = 0 if rng.random() < 0.05 else None
        image, boxes = render_scene(rng, width, height, n_objects)
        quality = int(rng.integers(60, 96))
        stem = f"{split}_{i:05d}_{width}x{height}"
        ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise RuntimeError(f"JPEG encoding failed for {stem}")
        (image_dir / f"{stem}.jpg").write_bytes(buf.tobytes())
        lines = [box.yolo_line(width, height) for box in boxes]
        (label_dir / f"{stem}.txt").write_text("".join(line + "\n" for line in lines))
        n_boxes += len(boxes)
    return n_boxes


def write_data_yaml(out: Path) -> Path:
    """The ultralytics data file naming the splits and classes."""
    names = "\n".join(f"  {i}: {name}" for i, name in enumerate(CLASS_NAMES))
    text = (
        f"# synthetic shapes, written by scripts/make_dataset.py\n"
        f"path: {out.resolve()}\n"
        f"train: images/train\nval: images/val\ntest: images/test\n"
        f"names:\n{names}\n"
    )
    path = out / "data.yaml"
    path.write_text(text)
    return path


def write_recipe(out: Path, seed: int, counts: dict[str, int]) -> None:
    """`recipe.json`: what made this data set, read by train_test_model.py for the model card."""
    recipe = {
        "generator": "scripts/make_dataset.py + devtools/src/inference_devtools/synthetic.py",
        "seed": seed,
        "counts": counts,
        "sizes": [f"{w}x{h}" for w, h in SIZES],
        "jpeg_quality": [60, 95],
        "empty_fraction": 0.05,
        "classes": list(CLASS_NAMES),
    }
    (out / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")


CONFORMANCE_QUALITY: Final[int] = 85
# Shapes of 8-35 % of the short side: big enough for the test model at imgsz 320 on any frame size.
CONFORMANCE_SIZE_RANGE: Final[tuple[float, float]] = (0.08, 0.35)
CONFORMANCE_FRAMES: Final[tuple[tuple[str, int, int, int | None], ...]] = (
    # (description, width, height, objects; None: random 1-8)
    ("hd_clutter", 1280, 720, 6),
    ("hd_few", 1280, 720, 2),
    ("hd_many", 1280, 720, 8),
    ("hd_random_a", 1280, 720, None),
    ("hd_random_b", 1280, 720, None),
    ("hd_empty", 1280, 720, 0),
    ("fullhd_a", 1920, 1080, 5),
    ("fullhd_b", 1920, 1080, None),
    ("portrait_a", 720, 1280, 4),
    ("portrait_b", 720, 1280, None),
    ("tiny", 64, 48, 1),
    ("huge_flat", 4000, 3000, 4),
    ("square_a", 500, 500, 3),
    ("square_b", 500, 500, None),
    ("odd_tall_a", 333, 777, 3),
    ("odd_tall_b", 333, 777, None),
    ("odd_wide", 777, 333, 3),
    ("odd_near_hd", 1279, 719, 5),
    ("small_16x9", 640, 360, 4),
    ("vga", 640, 480, None),
)


@dataclass(frozen=True, slots=True)
class PhotoSource:
    """One real photo shipped inside an installed package."""

    name: str
    """File stem written under the photos folder."""
    package: str
    """Import name of the package that ships it."""
    relpath: str
    """Path inside the package."""
    origin: str
    """Distribution and version range it was taken from, for SOURCES.md."""
    licence: str
    """Licence of the image as its package documents it."""
    paste: bool
    """Whether synthetic shapes are pasted on it."""


_ULTRALYTICS_LICENCE: Final[str] = (
    "AGPL-3.0, the package's licence; the package states no separate licence for the photo"
)
PHOTOS: Final[tuple[PhotoSource, ...]] = (
    PhotoSource("bus", "ultralytics", "assets/bus.jpg", "ultralytics", _ULTRALYTICS_LICENCE, False),
    PhotoSource(
        "zidane", "ultralytics", "assets/zidane.jpg", "ultralytics", _ULTRALYTICS_LICENCE, False
    ),
    PhotoSource(
        "china",
        "sklearn",
        "datasets/images/china.jpg",
        "scikit-learn",
        "CC BY 2.0, danielbuechele (Flickr), per the package's images/README.txt",
        False,
    ),
    PhotoSource(
        "flower",
        "sklearn",
        "datasets/images/flower.jpg",
        "scikit-learn",
        "CC BY 2.0, vultilion (Flickr), per the package's images/README.txt",
        True,
    ),
    PhotoSource(
        "grace_hopper",
        "matplotlib",
        "mpl-data/sample_data/grace_hopper.jpg",
        "matplotlib",
        "public domain (US Navy photograph); matplotlib sample data",
        False,
    ),
    PhotoSource(
        "astronaut", "skimage", "data/astronaut.png", "scikit-image", "public domain (NASA)", True
    ),
    PhotoSource(
        "camera", "skimage", "data/camera.png", "scikit-image", "CC0 (Lav Varshney)", False
    ),
    PhotoSource(
        "chelsea", "skimage", "data/chelsea.png", "scikit-image", "CC0 (Stefan van der Walt)", True
    ),
    PhotoSource(
        "coffee", "skimage", "data/coffee.png", "scikit-image", "CC0 (Rachel Michetti)", True
    ),
    PhotoSource(
        "rocket", "skimage", "data/rocket.jpg", "scikit-image", "public domain (SpaceX)", True
    ),
    PhotoSource(
        "hubble_deep_field",
        "skimage",
        "data/hubble_deep_field.jpg",
        "scikit-image",
        "public domain (NASA)",
        False,
    ),
    PhotoSource(
        "retina", "skimage", "data/retina.jpg", "scikit-image", "CC0 1.0 (Häggström 2014)", True
    ),
    PhotoSource(
        "clock_motion",
        "skimage",
        "data/clock_motion.png",
        "scikit-image",
        "public domain (Stefan van der Walt)",
        True,
    ),
    PhotoSource(
        "coins",
        "skimage",
        "data/coins.png",
        "scikit-image",
        "no known copyright restrictions",
        False,
    ),
    PhotoSource(
        "immunohistochemistry",
        "skimage",
        "data/ihc.png",
        "scikit-image",
        "no known copyright restrictions",
        False,
    ),
    PhotoSource("brick", "skimage", "data/brick.png", "scikit-image", "CC0 (CC0Textures)", True),
    PhotoSource("grass", "skimage", "data/grass.png", "scikit-image", "CC0 (CC0Textures)", True),
    PhotoSource("gravel", "skimage", "data/gravel.png", "scikit-image", "CC0 (CC0Textures)", True),
    PhotoSource("cell", "skimage", "data/cell.png", "scikit-image", "CC0", True),
    PhotoSource("text", "skimage", "data/text.png", "scikit-image", "public domain", False),
    PhotoSource("page", "skimage", "data/page.png", "scikit-image", "public domain", False),
    PhotoSource(
        "microaneurysms",
        "skimage",
        "data/microaneurysms.png",
        "scikit-image",
        "CC0 (Andreas Maier)",
        False,
    ),
)
PHOTO_MAX_SIDE: Final[int] = 1280
PHOTO_QUALITY: Final[int] = 88


def _box_json(box: Box) -> dict[str, object]:
    return {
        "class_id": box.class_id,
        "class_name": box.class_name,
        "x1": box.x1,
        "y1": box.y1,
        "x2": box.x2,
        "y2": box.y2,
    }


def _write_jpeg(path: Path, image: npt.NDArray[np.uint8], quality: int) -> None:
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError(f"JPEG encoding failed for {path}")
    path.write_bytes(buf.tobytes())


def write_conformance(out: Path, seed: int) -> None:
    """The 20 synthetic conformance frames and `labels.json` (boxes as drawn, before JPEG)."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(len(SPLITS) + 1)[-1])
    labels: dict[str, object] = {}
    for i, (desc, width, height, n) in enumerate(CONFORMANCE_FRAMES, start=1):
        background = None
        degrade = True
        if desc == "huge_flat":  # a smooth two-colour gradient, so that it compresses well
            xs = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
            ys = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
            c1 = np.array([170, 190, 205], dtype=np.float32)
            c2 = np.array([110, 140, 120], dtype=np.float32)
            t = (xs + ys) / np.float32(2.0)
            background = (c1 * (1 - t) + c2 * t).astype(np.uint8)
            degrade = False
        image, boxes = render_scene(
            rng,
            width,
            height,
            n,
            background,
            occluders=degrade,
            degrade=degrade,
            size_range=CONFORMANCE_SIZE_RANGE,
        )
        name = f"{i:02d}_{width}x{height}_{desc}.jpg"
        _write_jpeg(out / name, image, CONFORMANCE_QUALITY)
        labels[name] = {"width": width, "height": height, "boxes": [_box_json(b) for b in boxes]}
        log.info("%s: %d boxes, %d bytes", name, len(boxes), (out / name).stat().st_size)
    (out / "labels.json").write_text(json.dumps(labels, indent=1) + "\n")


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {package} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def _distribution_version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def write_photos(out: Path, seed: int) -> None:
    """Real photos from installed packages (<= 1280 px), half with pasted shapes; SOURCES.md."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(len(SPLITS) + 2)[-1])
    labels: dict[str, object] = {}
    rows: list[str] = []
    for src in PHOTOS:
        path = _package_dir(src.package) / src.relpath
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if image is None:
            raise RuntimeError(f"cannot read {path}")
        if image.ndim == 3 and image.shape[2] == 4:
            image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
        height, width = image.shape[:2]
        scale = PHOTO_MAX_SIDE / max(width, height)
        if scale < 1.0:
            size = (round(width * scale), round(height * scale))
            image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        name = f"{src.name}.jpg"
        boxes: list[Box] = []
        if src.paste:
            if image.ndim == 2:
                image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
            image, boxes = paste_objects(rng, np.ascontiguousarray(image), int(rng.integers(3, 6)))
            name = f"{src.name}_shapes.jpg"
        _write_jpeg(out / name, np.asarray(image, dtype=np.uint8), PHOTO_QUALITY)
        h, w = image.shape[:2]
        kind = "grey" if image.ndim == 2 else "colour"
        labels[name] = {"width": w, "height": h, "boxes": [_box_json(b) for b in boxes]}
        what = f"{len(boxes)} pasted shapes" if src.paste else "as shipped"
        rows.append(
            f"| `{name}` | {w}x{h} {kind} | {src.origin} {_distribution_version(src.origin)}, "
            f"`{src.package}/{src.relpath}` | {src.licence} | {what} |"
        )
        log.info("%s: %dx%d, %d pasted boxes", name, w, h, len(boxes))
    (out / "labels.json").write_text(json.dumps(labels, indent=1) + "\n")
    text = (
        "# Real photos for conformance tests\n\n"
        "Written by `scripts/make_dataset.py --photos tests/data/photos` from images that "
        "installed Python packages ship, downscaled (INTER_AREA) to at most "
        f"{PHOTO_MAX_SIDE} px on the long side and saved as JPEG quality {PHOTO_QUALITY}. "
        "Files named `*_shapes.jpg` have synthetic shapes of the test model's classes "
        "(disc, square, triangle, star) pasted on by `inference_devtools.synthetic` "
        "(`paste_objects`); their boxes are in `labels.json`. Grey-scale sources stay "
        "single-channel JPEGs unless shapes were pasted on.\n\n"
        "| file | size | origin (distribution, path in package) | licence | content |\n"
        "|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )
    (out / "SOURCES.md").write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=Path("data/synth"))
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--train", type=int, default=1200)
    parser.add_argument("--val", type=int, default=200)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--force", action="store_true", help="replace an existing data set")
    parser.add_argument("--conformance", type=Path, help="write the conformance frames here")
    parser.add_argument("--photos", type=Path, help="write the real photos here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.conformance or args.photos:
        if args.conformance:
            write_conformance(args.conformance, args.seed)
        if args.photos:
            write_photos(args.photos, args.seed)
        return 0

    out: Path = args.out
    if out.exists():
        if not args.force:
            log.error("%s exists; pass --force to replace it", out)
            return 1
        shutil.rmtree(out)
    counts = {"train": args.train, "val": args.val, "test": args.test}
    children = np.random.SeedSequence(args.seed).spawn(len(SPLITS))
    for split, child in zip(SPLITS, children, strict=True):
        started = time.perf_counter()
        n_boxes = write_split(out, split, counts[split], np.random.default_rng(child))
        log.info(
            "%s: %d images, %d boxes in %.1f s",
            split,
            counts[split],
            n_boxes,
            time.perf_counter() - started,
        )
    write_recipe(out, args.seed, counts)
    log.info("wrote %s", write_data_yaml(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Write the synthetic detection data set for the test model in ultralytics YOLO layout.

    .venv/bin/python scripts/make_dataset.py [--out data/synth] [--seed 20261128]

Layout under ``--out`` (gitignored): ``images/{train,val,test}/*.jpg``, ``labels/{train,val,test}/
*.txt`` (one ``class cx cy w h`` line per box, normalised), and ``data.yaml``. Each split draws from
its own child of ``numpy.random.SeedSequence(seed)``, so one seed reproduces every file. Frame sizes
cycle through 640x360, 480x480, 360x640 and 800x450; each image is saved as JPEG at a quality drawn
from 60-95; about 5 % of the images have no objects (background only). See `synthetic.py` for
what a scene contains and how boxes are defined.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Final

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import CLASS_NAMES, render_scene

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
        "generator": "scripts/make_dataset.py + scripts/synthetic.py",
        "seed": seed,
        "counts": counts,
        "sizes": [f"{w}x{h}" for w, h in SIZES],
        "jpeg_quality": [60, 95],
        "empty_fraction": 0.05,
        "classes": list(CLASS_NAMES),
    }
    (out / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=Path("data/synth"))
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--train", type=int, default=1200)
    parser.add_argument("--val", type=int, default=200)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--force", action="store_true", help="replace an existing data set")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

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

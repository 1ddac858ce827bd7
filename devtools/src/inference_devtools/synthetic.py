"""Synthetic detection scenes for the test model: four classes of filled shapes on textured ground.

Everything here is drawn with numpy and OpenCV from a caller-supplied `numpy.random.Generator`, so a
seed reproduces a data set exactly. Nothing is downloaded and no fonts are used.

Classes (`CLASS_NAMES`, index = class id): ``disc``, ``square``, ``triangle``, ``star``. Each
object is a filled shape with a random colour and one of four fill styles (solid, two-colour
linear gradient, solid with a contrasting outline band, stripes), rotated, mildly stretched
(aspect 0.85-1.18), from about 16 px up to about 40 % of the frame's short side.

Labels (`Box`)
    A box is the **visible extent** of its object: the tight bounds of the pixels where the object
    is the topmost thing drawn (after later objects and occluders have covered it, and clipped to
    the frame). An object whose visible pixel count is under 30 % of its full (analytic) area, that
    is, one more than 70 % hidden by other objects, occluders or the frame edge, is dropped from
    the labels; so is one whose visible extent is narrower than 4 px. Coordinates are integers in
    the continuous pixel convention: the box covers ``x1 <= x < x2``, ``y1 <= y < y2``, so
    ``x2 - x1`` is the width in pixels.

Scenes
    `render_scene` draws one frame: a textured background (value noise, gradient, checker, stripes,
    optionally with random lines and irregular blobs), the objects, zero to two occluders (long bars
    or irregular blobs, never one of the four classes) and then degradation (Gaussian noise, an
    occasional slight blur, a JPEG round trip). `render_sequence` draws frames of objects moving and
    turning smoothly over one fixed background, passing behind fixed occluding posts.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final, Literal

import cv2
import numpy as np
import numpy.typing as npt

__all__ = [
    "CLASS_NAMES",
    "Box",
    "ShapeSpec",
    "paste_objects",
    "random_background",
    "render_scene",
    "render_sequence",
]

CLASS_NAMES: Final[tuple[str, ...]] = ("disc", "square", "triangle", "star")
"""Class names; the index of a name is its class id."""

Image = npt.NDArray[np.uint8]
FillStyle = Literal["solid", "gradient", "outline", "stripes"]

_FILL_STYLES: Final[tuple[FillStyle, ...]] = ("solid", "gradient", "outline", "stripes")
_MIN_VISIBLE_FRACTION: Final[float] = 0.30
_MIN_VISIBLE_SIDE: Final[int] = 4
_MIN_SIZE_PX: Final[float] = 16.0
_MAX_SIZE_FRACTION: Final[float] = 0.40
_MIN_COLOUR_DISTANCE: Final[float] = 70.0
_SHIFT: Final[int] = 4  # sub-pixel bits for cv2.fillPoly
_OCCLUDER_ID: Final[int] = -2
_EMPTY: Final[int] = -1


@dataclass(frozen=True, slots=True)
class Box:
    """One labelled object: the visible extent of a shape, in pixels of the frame."""

    class_id: int
    """Index into `CLASS_NAMES`."""
    x1: int
    """Left edge (inclusive pixel column)."""
    y1: int
    """Top edge (inclusive pixel row)."""
    x2: int
    """Right edge (exclusive: one past the last visible column)."""
    y2: int
    """Bottom edge (exclusive: one past the last visible row)."""

    @property
    def class_name(self) -> str:
        """The class's name."""
        return CLASS_NAMES[self.class_id]

    def yolo_line(self, width: int, height: int) -> str:
        """The box as one line of an ultralytics YOLO label file (normalised centre and size)."""
        cx = (self.x1 + self.x2) / 2.0 / width
        cy = (self.y1 + self.y2) / 2.0 / height
        w = (self.x2 - self.x1) / width
        h = (self.y2 - self.y1) / height
        return f"{self.class_id} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}"


@dataclass(frozen=True, slots=True)
class ShapeSpec:
    """Everything needed to draw one object; immutable, so a sequence moves it with `moved`."""

    class_id: int
    """Index into `CLASS_NAMES`."""
    cx: float
    """Centre x in pixels."""
    cy: float
    """Centre y in pixels."""
    size: float
    """Diameter of the shape's circumscribed circle before stretching, in pixels."""
    angle: float
    """Rotation in radians."""
    aspect: float
    """Stretch of the x axis relative to the y axis before rotation."""
    style: FillStyle
    """How the shape is filled."""
    colour: tuple[int, int, int]
    """Main BGR colour."""
    colour2: tuple[int, int, int]
    """Second BGR colour (gradient end, outline band, stripes)."""
    param: float
    """Shape detail: a star's inner radius, a triangle's vertex-jitter seed; unused otherwise."""
    pattern_angle: float
    """Direction of the gradient or the stripes, in radians."""

    def moved(self, dx: float, dy: float, dangle: float) -> ShapeSpec:
        """This shape translated by (dx, dy) pixels and turned by `dangle` radians."""
        return ShapeSpec(
            class_id=self.class_id,
            cx=self.cx + dx,
            cy=self.cy + dy,
            size=self.size,
            angle=self.angle + dangle,
            aspect=self.aspect,
            style=self.style,
            colour=self.colour,
            colour2=self.colour2,
            param=self.param,
            pattern_angle=self.pattern_angle,
        )


# --------------------------------------------------------------------------- geometry


def _unit_outline(class_id: int, param: float) -> npt.NDArray[np.float64]:
    """The shape's outline as (N, 2) points around the origin, circumscribed radius about 1."""
    t: npt.NDArray[np.float64]
    if class_id == 0:  # disc
        t = np.linspace(0.0, 2.0 * math.pi, 72, endpoint=False, dtype=np.float64)
        return np.stack([np.cos(t), np.sin(t)], axis=1)
    if class_id == 1:  # square
        h = math.sqrt(0.5)
        return np.array([[-h, -h], [h, -h], [h, h], [-h, h]], dtype=np.float64)
    if class_id == 2:  # triangle, vertices jittered by up to +-6 % from a deterministic seed
        jitter = np.random.default_rng(int(param * 1e6)).uniform(-0.06, 0.06, size=(3, 2))
        t = -math.pi / 2.0 + np.arange(3, dtype=np.float64) * (2.0 * math.pi / 3.0)
        pts: npt.NDArray[np.float64] = np.stack([np.cos(t), np.sin(t)], axis=1) + jitter
        # centre the triangle on its bounding box so that `cx, cy` is the box centre
        centred: npt.NDArray[np.float64] = pts - (pts.max(axis=0) + pts.min(axis=0)) / 2.0
        return centred
    if class_id == 3:  # five-pointed star, inner radius `param`
        t = -math.pi / 2.0 + np.arange(10, dtype=np.float64) * (math.pi / 5.0)
        r = np.where(np.arange(10) % 2 == 0, 1.0, param)
        return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)
    raise ValueError(f"unknown class id {class_id}")


def _outline(spec: ShapeSpec, scale: float = 1.0) -> npt.NDArray[np.float64]:
    """The shape's outline in frame pixels, (N, 2) float."""
    pts = _unit_outline(spec.class_id, spec.param) * (spec.size / 2.0 * scale)
    pts[:, 0] *= spec.aspect
    c, s = math.cos(spec.angle), math.sin(spec.angle)
    rot = np.array([[c, -s], [s, c]])
    out: npt.NDArray[np.float64] = pts @ rot.T + np.array([spec.cx, spec.cy])
    return out


def _fixed(pts: npt.NDArray[np.float64]) -> npt.NDArray[np.int32]:
    """Polygon points in OpenCV's fixed-point form (`_SHIFT` fractional bits), (N, 2) int32."""
    return np.round(pts * (1 << _SHIFT)).astype(np.int32).reshape(-1, 2)


def _fill(
    canvas: Image, fixed: npt.NDArray[np.int32], colour: float | tuple[int, int, int], aa: bool
) -> None:
    """Fill one fixed-point polygon in place, anti-aliased or not."""
    cv2.fillPoly(canvas, [fixed], colour, cv2.LINE_AA if aa else cv2.LINE_8, _SHIFT)


def _fill_polygon(canvas: Image, pts: npt.NDArray[np.float64], value: int, aa: bool) -> None:
    _fill(canvas, _fixed(pts), value, aa)


# --------------------------------------------------------------------------- colours and fills


def _random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    hsv = np.array(
        [[[rng.integers(0, 180), rng.integers(60, 256), rng.integers(50, 256)]]], dtype=np.uint8
    )
    bgr = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0]
    return int(bgr[0]), int(bgr[1]), int(bgr[2])


def _contrasting_colour(
    rng: np.random.Generator, against: npt.NDArray[np.float64], tries: int = 12
) -> tuple[int, int, int]:
    """A random colour at least `_MIN_COLOUR_DISTANCE` (BGR Euclidean) from `against`, if found."""
    best = _random_colour(rng)
    best_d = -1.0
    for _ in range(tries):
        cand = _random_colour(rng)
        d = float(np.linalg.norm(np.array(cand, dtype=np.float64) - against))
        if d >= _MIN_COLOUR_DISTANCE:
            return cand
        if d > best_d:
            best, best_d = cand, d
    # fall back to the farther of the best candidate and the mean's complement
    comp = tuple(int(255 - v) for v in against)
    comp_d = float(np.linalg.norm(np.array(comp, dtype=np.float64) - against))
    if comp_d > best_d:
        return comp[0], comp[1], comp[2]
    return best


def _pattern(spec: ShapeSpec, x0: int, y0: int, w: int, h: int) -> npt.NDArray[np.float32]:
    """The fill of `spec` over the frame region (x0, y0, w, h), float32 BGR."""
    c1 = np.array(spec.colour, dtype=np.float32)
    c2 = np.array(spec.colour2, dtype=np.float32)
    if spec.style in ("solid", "outline"):
        return np.broadcast_to(c1, (h, w, 3)).astype(np.float32)
    xs = np.arange(x0, x0 + w, dtype=np.float32) - np.float32(spec.cx)
    ys = np.arange(y0, y0 + h, dtype=np.float32) - np.float32(spec.cy)
    proj = (
        xs[None, :] * np.float32(math.cos(spec.pattern_angle))
        + ys[:, None] * np.float32(math.sin(spec.pattern_angle))
    ).astype(np.float32)
    if spec.style == "gradient":
        t = np.clip(proj / np.float32(max(spec.size, 1.0)) + np.float32(0.5), 0.0, 1.0)
    else:  # stripes
        period = max(spec.size / 4.0, 4.0)
        t = ((np.floor(proj / np.float32(period / 2.0)) % 2) * 0.85).astype(np.float32)
    t3 = t[:, :, None]
    out: npt.NDArray[np.float32] = c1 * (np.float32(1.0) - t3) + c2 * t3
    return out


def _draw_shape(frame: Image, owner: npt.NDArray[np.int32], spec: ShapeSpec, index: int) -> None:
    """Composite `spec` onto `frame` with anti-aliased edges and mark its pixels in `owner`."""
    height, width = frame.shape[:2]
    pts = _outline(spec)
    x0 = max(math.floor(pts[:, 0].min()) - 1, 0)
    y0 = max(math.floor(pts[:, 1].min()) - 1, 0)
    x1 = min(math.ceil(pts[:, 0].max()) + 2, width)
    y1 = min(math.ceil(pts[:, 1].max()) + 2, height)
    if x1 <= x0 or y1 <= y0:
        return
    w, h = x1 - x0, y1 - y0
    local = pts - np.array([x0, y0], dtype=np.float64)
    alpha_u8 = np.zeros((h, w), dtype=np.uint8)
    _fill_polygon(alpha_u8, local, 255, aa=True)
    patch = _pattern(spec, x0, y0, w, h)
    if spec.style == "outline":
        band = min(max(spec.size * 0.07, 1.5), spec.size * 0.3)
        inner = _outline(spec, scale=max(1.0 - 2.0 * band / spec.size, 0.2))
        inner_u8 = np.zeros((h, w), dtype=np.uint8)
        _fill_polygon(inner_u8, inner - np.array([x0, y0], dtype=np.float64), 255, aa=True)
        ia = (inner_u8.astype(np.float32) / np.float32(255.0))[:, :, None]
        c2 = np.array(spec.colour2, dtype=np.float32)
        patch = patch * ia + c2 * (np.float32(1.0) - ia)
    alpha = (alpha_u8.astype(np.float32) / np.float32(255.0))[:, :, None]
    roi = frame[y0:y1, x0:x1].astype(np.float32)
    blended = roi * (np.float32(1.0) - alpha) + patch * alpha
    frame[y0:y1, x0:x1] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    owner[y0:y1, x0:x1][alpha_u8 >= 128] = index


# --------------------------------------------------------------------------- backgrounds


def _value_noise(
    rng: np.random.Generator, width: int, height: int, cell: float, channels: int
) -> npt.NDArray[np.float32]:
    gw = max(2, int(width / cell) + 2)
    gh = max(2, int(height / cell) + 2)
    grid = rng.random((gh, gw, channels), dtype=np.float32)
    out = cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)
    return np.asarray(out, dtype=np.float32).reshape(height, width, channels)


def _linear_gradient(
    rng: np.random.Generator,
    width: int,
    height: int,
    c1: npt.NDArray[np.float32],
    c2: npt.NDArray[np.float32],
) -> npt.NDArray[np.float32]:
    a = rng.uniform(0.0, 2.0 * math.pi)
    xs = np.linspace(-0.5, 0.5, width, dtype=np.float32)
    ys = np.linspace(-0.5, 0.5, height, dtype=np.float32) * np.float32(height / max(width, 1))
    t = xs[None, :] * np.float32(math.cos(a)) + ys[:, None] * np.float32(math.sin(a))
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    t3 = t[:, :, None].astype(np.float32)
    out: npt.NDArray[np.float32] = c1 * (np.float32(1.0) - t3) + c2 * t3
    return out


def _irregular_blob(
    rng: np.random.Generator, cx: float, cy: float, radius: float
) -> npt.NDArray[np.float64]:
    """A jagged polygon that is none of the four classes (7-13 vertices, radii 0.35-1)."""
    n = int(rng.integers(7, 14))
    t = np.sort(rng.uniform(0.0, 2.0 * math.pi, size=n))
    r = radius * rng.uniform(0.35, 1.0, size=n)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)


def _clutter(rng: np.random.Generator, frame: Image) -> None:
    """Random lines and irregular blobs, drawn into the background (never labelled)."""
    height, width = frame.shape[:2]
    diag = math.hypot(width, height)
    for _ in range(int(rng.integers(2, 12))):
        p1 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        p2 = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        cv2.line(frame, p1, p2, _random_colour(rng), int(rng.integers(1, 4)), cv2.LINE_AA)
    for _ in range(int(rng.integers(0, 4))):
        pts = _irregular_blob(
            rng, rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.02, 0.08) * diag
        )
        _fill(frame, _fixed(pts), _random_colour(rng), aa=True)


def random_background(rng: np.random.Generator, width: int, height: int) -> Image:
    """A textured background: value noise, a gradient, a checker or stripes, maybe with clutter."""
    kind = int(rng.integers(0, 4))
    base = np.array(_random_colour(rng), dtype=np.float32)
    other = np.array(_random_colour(rng), dtype=np.float32)
    if kind == 0:  # coloured value noise at two scales
        coarse = _value_noise(rng, width, height, rng.uniform(40, 200), 3)
        fine = _value_noise(rng, width, height, rng.uniform(4, 16), 1)
        img = (
            base * np.float32(0.5)
            + (coarse - np.float32(0.5)) * np.float32(rng.uniform(60, 180))
            + (fine - np.float32(0.5)) * np.float32(rng.uniform(10, 50))
        )
        img = img + np.float32(60.0)
    elif kind == 1:  # gradient
        img = _linear_gradient(rng, width, height, base, other)
    else:  # low-contrast checker (2) or stripes (3), rotated
        a = rng.uniform(0.0, math.pi)
        cell = rng.uniform(8, 60)
        xs = np.arange(width, dtype=np.float32)[None, :]
        ys = np.arange(height, dtype=np.float32)[:, None]
        u = xs * np.float32(math.cos(a)) + ys * np.float32(math.sin(a))
        v = -xs * np.float32(math.sin(a)) + ys * np.float32(math.cos(a))
        if kind == 2:
            t = ((np.floor(u / np.float32(cell)) + np.floor(v / np.float32(cell))) % 2).astype(
                np.float32
            )
        else:
            t = (np.sin(u * np.float32(math.pi / cell)) * np.float32(0.5) + np.float32(0.5)).astype(
                np.float32
            )
        delta = (other - base) * np.float32(rng.uniform(0.15, 0.45))
        img = base + t[:, :, None] * delta
    frame: Image = np.clip(img, 0, 255).astype(np.uint8)
    if rng.random() < 0.5:
        _clutter(rng, frame)
    return frame


# --------------------------------------------------------------------------- objects


def _random_spec(
    rng: np.random.Generator,
    width: int,
    height: int,
    background: Image,
    class_id: int | None = None,
    size_range: tuple[float, float] | None = None,
) -> ShapeSpec:
    short = min(width, height)
    if size_range is None:
        hi = max(_MAX_SIZE_FRACTION * short, _MIN_SIZE_PX + 1.0)
        lo = min(_MIN_SIZE_PX, hi - 1.0)
    else:
        lo = max(size_range[0] * short, 2.0)
        hi = max(size_range[1] * short, lo + 1.0)
    size = float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    cid = int(rng.integers(0, len(CLASS_NAMES))) if class_id is None else class_id
    margin = size * 0.25
    cx = float(rng.uniform(margin, max(width - margin, margin + 1.0)))
    cy = float(rng.uniform(margin, max(height - margin, margin + 1.0)))
    r = int(size / 2)
    x0, x1 = max(int(cx) - r, 0), min(int(cx) + r + 1, width)
    y0, y1 = max(int(cy) - r, 0), min(int(cy) + r + 1, height)
    region = background[y0:y1, x0:x1].reshape(-1, 3)
    mean = (
        region.mean(axis=0).astype(np.float64)
        if region.size
        else np.full(3, 128.0, dtype=np.float64)
    )
    colour = _contrasting_colour(rng, mean)
    colour2 = _contrasting_colour(rng, np.array(colour, dtype=np.float64))
    return ShapeSpec(
        class_id=cid,
        cx=cx,
        cy=cy,
        size=size,
        angle=float(rng.uniform(0.0, 2.0 * math.pi)),
        aspect=float(math.exp(rng.uniform(math.log(0.85), math.log(1.18)))),
        style=_FILL_STYLES[int(rng.integers(0, len(_FILL_STYLES)))],
        colour=colour,
        colour2=colour2,
        param=float(rng.uniform(0.38, 0.5)) if cid == 3 else float(rng.random()),
        pattern_angle=float(rng.uniform(0.0, 2.0 * math.pi)),
    )


def _overlap(a: ShapeSpec, b: ShapeSpec) -> float:
    """Intersection of the two circumscribed squares over the smaller one's area."""
    ra, rb = a.size / 2.0, b.size / 2.0
    ix = max(0.0, min(a.cx + ra, b.cx + rb) - max(a.cx - ra, b.cx - rb))
    iy = max(0.0, min(a.cy + ra, b.cy + rb) - max(a.cy - ra, b.cy - rb))
    return ix * iy / max(min(ra, rb) ** 2 * 4.0, 1e-6)


def _place_specs(
    rng: np.random.Generator,
    width: int,
    height: int,
    background: Image,
    n: int,
    size_range: tuple[float, float] | None = None,
) -> list[ShapeSpec]:
    """`n` random shapes, re-drawing positions (a few tries) that would mostly cover another."""
    specs: list[ShapeSpec] = []
    for _ in range(n):
        spec = _random_spec(rng, width, height, background, size_range=size_range)
        for _try in range(8):
            if all(_overlap(spec, other) < 0.5 for other in specs):
                break
            spec = _random_spec(rng, width, height, background, size_range=size_range)
        specs.append(spec)
    return specs


def _boxes(owner: npt.NDArray[np.int32], specs: list[ShapeSpec]) -> list[Box]:
    """The visible extent of every shape that is at least 30 % visible, in drawing order."""
    height, width = owner.shape
    boxes: list[Box] = []
    for index, spec in enumerate(specs):
        pts = _outline(spec)
        full_area = abs(float(cv2.contourArea(pts.astype(np.float32))))
        x0 = max(math.floor(pts[:, 0].min()) - 1, 0)
        y0 = max(math.floor(pts[:, 1].min()) - 1, 0)
        x1 = min(math.ceil(pts[:, 0].max()) + 2, width)
        y1 = min(math.ceil(pts[:, 1].max()) + 2, height)
        if x1 <= x0 or y1 <= y0 or full_area <= 0.0:
            continue
        ys, xs = np.nonzero(owner[y0:y1, x0:x1] == index)
        if xs.size < _MIN_VISIBLE_FRACTION * full_area:
            continue
        bx1, bx2 = x0 + int(xs.min()), x0 + int(xs.max()) + 1
        by1, by2 = y0 + int(ys.min()), y0 + int(ys.max()) + 1
        if bx2 - bx1 < _MIN_VISIBLE_SIDE or by2 - by1 < _MIN_VISIBLE_SIDE:
            continue
        boxes.append(Box(spec.class_id, bx1, by1, bx2, by2))
    return boxes


def _draw_occluders(rng: np.random.Generator, frame: Image, owner: npt.NDArray[np.int32]) -> None:
    """Zero to two occluders (long bars or irregular blobs) on top of everything."""
    height, width = frame.shape[:2]
    short = min(width, height)
    for _ in range(int(rng.choice([0, 0, 1, 1, 2]))):
        if rng.random() < 0.5:  # a bar at least 4:1 long, so it is never a square
            thick = rng.uniform(0.03, 0.08) * short
            length = rng.uniform(4.0, 12.0) * thick
            cx, cy = rng.uniform(0, width), rng.uniform(0, height)
            a = rng.uniform(0.0, math.pi)
            c, s = math.cos(a), math.sin(a)
            hx, hy = length / 2.0, thick / 2.0
            corners = np.array([[-hx, -hy], [hx, -hy], [hx, hy], [-hx, hy]])
            pts = corners @ np.array([[c, -s], [s, c]]).T + np.array([cx, cy])
        else:
            pts = _irregular_blob(
                rng, rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.06, 0.18) * short
            )
        fixed = _fixed(pts)
        _fill(frame, fixed, _random_colour(rng), aa=True)
        mask = np.zeros(owner.shape, dtype=np.uint8)
        _fill(mask, fixed, 255, aa=False)
        owner[mask > 0] = _OCCLUDER_ID


def _degrade(rng: np.random.Generator, frame: Image) -> Image:
    """Gaussian noise, sometimes a slight blur, usually a JPEG round trip."""
    out = frame
    if rng.random() < 0.2:
        out = np.asarray(cv2.GaussianBlur(out, (3, 3), 0), dtype=np.uint8)
    if rng.random() < 0.7:
        sigma = rng.uniform(1.0, 9.0)
        noisy = out.astype(np.float32) + rng.normal(0.0, sigma, size=out.shape).astype(np.float32)
        out = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
    if rng.random() < 0.7:
        quality = int(rng.integers(35, 96))
        ok, buf = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, quality])
        if ok:
            out = np.asarray(cv2.imdecode(buf, cv2.IMREAD_COLOR), dtype=np.uint8)
    return out


def _check_size(width: int, height: int) -> None:
    if width < 8 or height < 8:
        raise ValueError(f"frame too small: {width}x{height} (at least 8x8)")


def _check_background(background: Image, width: int, height: int) -> Image:
    if background.shape != (height, width, 3) or background.dtype != np.uint8:
        raise ValueError(
            f"background must be uint8 of shape {(height, width, 3)}, got "
            f"{background.dtype} {background.shape}"
        )
    return background.copy()


def render_scene(
    rng: np.random.Generator,
    width: int,
    height: int,
    n_objects: int | None = None,
    background: Image | None = None,
    *,
    occluders: bool = True,
    degrade: bool = True,
    size_range: tuple[float, float] | None = None,
) -> tuple[Image, list[Box]]:
    """One BGR uint8 frame of `width` x `height` and the boxes of its visible objects.

    `n_objects` shapes are drawn (default: 1-8 at random); fewer may be labelled, see the module's
    docstring. `background`, if given, is a BGR uint8 image of exactly this size (it is copied, not
    changed); otherwise a random textured one is drawn. `occluders` adds zero to two bars or blobs
    on top; `degrade` adds noise, blur and JPEG artefacts. `size_range`, if given, is the
    (smallest, largest) shape size as fractions of the short side, instead of 16 px to 40 %.
    """
    _check_size(width, height)
    frame = (
        random_background(rng, width, height)
        if background is None
        else _check_background(background, width, height)
    )
    n = int(rng.integers(1, 9)) if n_objects is None else n_objects
    specs = _place_specs(rng, width, height, frame, n, size_range)
    owner = np.full((height, width), _EMPTY, dtype=np.int32)
    for index, spec in enumerate(specs):
        _draw_shape(frame, owner, spec, index)
    if occluders:
        _draw_occluders(rng, frame, owner)
    boxes = _boxes(owner, specs)
    if degrade:
        frame = _degrade(rng, frame)
    return frame, boxes


def paste_objects(
    rng: np.random.Generator, photo: Image, n_objects: int, *, max_fraction: float = 0.25
) -> tuple[Image, list[Box]]:
    """`photo` with `n_objects` shapes pasted on it (no occluders, no degradation), and their boxes.

    Sizes run from 5 % to `max_fraction` of the photo's short side (at least 16 px).
    """
    height, width = photo.shape[:2]
    _check_size(width, height)
    frame = _check_background(photo, width, height)
    short = min(width, height)
    specs: list[ShapeSpec] = []
    for i in range(n_objects):
        spec = _random_spec(rng, width, height, frame, class_id=i % len(CLASS_NAMES))
        lo = max(_MIN_SIZE_PX, 0.05 * short)
        size = float(math.exp(rng.uniform(math.log(lo), math.log(max(max_fraction * short, lo)))))
        for _try in range(20):
            cand = ShapeSpec(
                class_id=spec.class_id,
                cx=float(rng.uniform(size * 0.6, width - size * 0.6)),
                cy=float(rng.uniform(size * 0.6, height - size * 0.6)),
                size=size,
                angle=spec.angle,
                aspect=spec.aspect,
                style=spec.style,
                colour=spec.colour,
                colour2=spec.colour2,
                param=spec.param,
                pattern_angle=spec.pattern_angle,
            )
            if all(_overlap(cand, other) < 0.05 for other in specs):
                break
        specs.append(cand)
    owner = np.full((height, width), _EMPTY, dtype=np.int32)
    for index, spec in enumerate(specs):
        _draw_shape(frame, owner, spec, index)
    return frame, _boxes(owner, specs)


def render_sequence(
    rng: np.random.Generator, width: int, height: int, n_frames: int, n_objects: int
) -> Iterator[tuple[Image, list[Box]]]:
    """`n_frames` frames of `n_objects` shapes gliding and turning over one fixed background.

    Each shape keeps a constant speed (0.4-1.5 % of the frame's diagonal per frame) and spin and
    bounces off the frame's edges; one or two fixed vertical posts occlude them as they pass. Each
    frame gets light Gaussian noise (no JPEG round trip: the caller encodes). Boxes follow the rules
    in the module's docstring.
    """
    _check_size(width, height)
    background = random_background(rng, width, height)
    short = min(width, height)
    diag = math.hypot(width, height)
    specs = _place_specs(rng, width, height, background, n_objects)
    # moving shapes stay between 6 % and 25 % of the short side, so they stay recognisable
    specs = [
        ShapeSpec(
            class_id=s.class_id,
            cx=float(np.clip(s.cx, s.size / 2.0 + 1.0, width - s.size / 2.0 - 1.0)),
            cy=float(np.clip(s.cy, s.size / 2.0 + 1.0, height - s.size / 2.0 - 1.0)),
            size=float(np.clip(s.size, max(_MIN_SIZE_PX, 0.06 * short), 0.25 * short)),
            angle=s.angle,
            aspect=s.aspect,
            style=s.style,
            colour=s.colour,
            colour2=s.colour2,
            param=s.param,
            pattern_angle=s.pattern_angle,
        )
        for s in specs
    ]
    velocity: list[tuple[float, float, float]] = []
    for _ in specs:
        speed = rng.uniform(0.004, 0.015) * diag
        heading = rng.uniform(0.0, 2.0 * math.pi)
        spin = rng.uniform(-0.05, 0.05)
        velocity.append((speed * math.cos(heading), speed * math.sin(heading), spin))
    posts: list[tuple[npt.NDArray[np.int32], tuple[int, int, int]]] = []
    for _ in range(int(rng.integers(1, 3))):
        x = rng.uniform(0.15, 0.85) * width
        half = rng.uniform(0.015, 0.035) * width
        y_top = rng.uniform(0.0, 0.4) * height
        pts = np.array(
            [[x - half, y_top], [x + half, y_top], [x + half, height], [x - half, height]]
        )
        posts.append((_fixed(pts), _random_colour(rng)))
    post_mask = np.zeros((height, width), dtype=np.uint8)
    for fixed, _colour in posts:
        _fill(post_mask, fixed, 255, aa=False)
    sigma = rng.uniform(1.0, 4.0)
    for _frame_no in range(n_frames):
        frame = background.copy()
        owner = np.full((height, width), _EMPTY, dtype=np.int32)
        for index, spec in enumerate(specs):
            _draw_shape(frame, owner, spec, index)
        for fixed, colour in posts:
            _fill(frame, fixed, colour, aa=True)
        owner[post_mask > 0] = _OCCLUDER_ID
        boxes = _boxes(owner, specs)
        noisy = frame.astype(np.float32) + rng.normal(0.0, sigma, size=frame.shape).astype(
            np.float32
        )
        yield np.clip(np.rint(noisy), 0, 255).astype(np.uint8), boxes
        # advance: bounce the centre off the edges
        for i, spec in enumerate(specs):
            vx, vy, spin = velocity[i]
            r = spec.size / 2.0
            if not r <= spec.cx + vx <= width - r:
                vx = -vx
            if not r <= spec.cy + vy <= height - r:
                vy = -vy
            velocity[i] = (vx, vy, spin)
            specs[i] = spec.moved(vx, vy, spin)

"""The numpy decode of a YOLOv8 head's raw outputs (used behind the ncnn runtime)."""

import numpy as np

from inference_service.runtime.yolo_head import decode_levels
from tests.conftest import CONF


def _levels(rng: np.random.Generator, input_hw: tuple[int, int], nc: int = 3):
    return [
        (
            rng.normal(0, 2, (64, input_hw[0] // s, input_hw[1] // s)).astype(np.float32),
            rng.normal(-4, 2, (nc, input_hw[0] // s, input_hw[1] // s)).astype(np.float32),
        )
        for s in (8, 16, 32)
    ]


def test_one_anchor_decodes_by_hand():
    # One 1x1 level of stride 32: distances are the expected bins of the softmaxes.
    box = np.full((64, 1, 1), -50.0, dtype=np.float32)
    for side, bin_ in enumerate((1, 2, 3, 4)):  # left, top, right, bottom
        box[side * 16 + bin_] = 50.0
    cls = np.array([[[0.0]], [[2.0]]], dtype=np.float32)
    out = decode_levels([(box, cls)], (32, 32))
    assert out.shape == (1, 6, 1)
    cx, cy, w, h = out[0, :4, 0]
    # anchor (0.5, 0.5): x1 = -0.5, y1 = -1.5, x2 = 3.5, y2 = 4.5 → ×32
    np.testing.assert_allclose([cx, cy, w, h], [1.5 * 32, 1.5 * 32, 4 * 32, 6 * 32], rtol=1e-5)
    np.testing.assert_allclose(out[0, 4:, 0], [0.5, 1 / (1 + np.exp(-2.0))], rtol=1e-6)


def test_levels_are_concatenated_in_anchor_order():
    # Every distance decodes to exactly one bin (logits +50 at bin 1, -50 elsewhere), so each box is
    # its anchor centre ± 1 cell; the class logit of each anchor encodes its level and cell.
    input_hw = (64, 96)
    levels = []
    want_centres = []
    want_logits = []
    for level, stride in enumerate((8, 16, 32)):
        h, w = input_hw[0] // stride, input_hw[1] // stride
        box = np.full((64, h, w), -50.0, dtype=np.float32)
        box[[1, 17, 33, 49]] = 50.0  # bin 1 of left, top, right and bottom
        ys, xs = np.mgrid[0:h, 0:w]
        cls = (level - 1 + (ys * w + xs) / (h * w)).astype(np.float32)[np.newaxis]
        levels.append((box, cls))
        for y in range(h):  # row-major: x runs fastest
            for x in range(w):
                want_centres.append(((x + 0.5) * stride, (y + 0.5) * stride, 2 * stride))
                want_logits.append(cls[0, y, x])
    out = decode_levels(levels, input_hw)
    assert out.shape == (1, 4 + 1, 8 * 12 + 4 * 6 + 2 * 3)
    cx, cy, w, h = out[0, :4]
    want = np.asarray(want_centres, dtype=np.float32)
    np.testing.assert_allclose(cx, want[:, 0], rtol=1e-5)
    np.testing.assert_allclose(cy, want[:, 1], rtol=1e-5)
    np.testing.assert_allclose(w, want[:, 2], rtol=1e-5)
    np.testing.assert_allclose(h, want[:, 2], rtol=1e-5)
    np.testing.assert_allclose(out[0, 4], 1 / (1 + np.exp(-np.asarray(want_logits))), rtol=1e-6)
    # Spot checks: the first anchors of the stride-8 grid, then the first of stride 16 and 32.
    assert cx[:3].tolist() == [4.0, 12.0, 20.0] and cy[:3].tolist() == [4.0, 4.0, 4.0]
    assert (cx[12], cy[12]) == (4.0, 12.0)  # second row of the stride-8 grid (12 columns)
    assert (cx[96], cy[96], w[96]) == (8.0, 8.0, 32.0)
    assert (cx[120], cy[120], w[120]) == (16.0, 16.0, 64.0)
    assert (cx[-1], cy[-1]) == (80.0, 48.0)


def test_score_floor_keeps_exactly_the_anchors_that_can_pass():
    rng = np.random.default_rng(1)
    levels = _levels(rng, (128, 160))
    full = decode_levels(levels, (128, 160))[0]
    pruned = decode_levels(levels, (128, 160), score_floor=CONF)[0]
    keep = full[4:].max(axis=0) >= CONF
    assert 0 < keep.sum() < keep.size
    # Every anchor scoring at least the floor survives, in order, with the same values; the only
    # extras are within float rounding of the floor.
    survivors = pruned[:, pruned[4:].max(axis=0) >= CONF]
    np.testing.assert_allclose(survivors, full[:, keep], rtol=1e-5, atol=1e-4)
    assert pruned.shape[1] - survivors.shape[1] <= 2

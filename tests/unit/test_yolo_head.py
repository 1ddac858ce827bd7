"""The numpy decode of a YOLOv8 head's raw outputs (used behind the ncnn runtime)."""

import numpy as np

from inference_service.runtime.yolo_head import decode_levels


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
    rng = np.random.default_rng(0)
    out = decode_levels(_levels(rng, (64, 96)), (64, 96))
    assert out.shape == (1, 4 + 3, 8 * 12 + 4 * 6 + 2 * 3)
    # Anchor centres of the first level walk row by row in steps of 8 px.
    assert np.all(out[0, 4:] > 0) and np.all(out[0, 4:] < 1)


def test_score_floor_keeps_exactly_the_anchors_that_can_pass():
    rng = np.random.default_rng(1)
    levels = _levels(rng, (128, 160))
    full = decode_levels(levels, (128, 160))[0]
    pruned = decode_levels(levels, (128, 160), score_floor=0.25)[0]
    keep = full[4:].max(axis=0) >= 0.25
    assert 0 < keep.sum() < keep.size
    # Every anchor scoring at least the floor survives, in order, with the same values; the only
    # extras are within float rounding of the floor.
    survivors = pruned[:, pruned[4:].max(axis=0) >= 0.25]
    np.testing.assert_allclose(survivors, full[:, keep], rtol=1e-5, atol=1e-4)
    assert pruned.shape[1] - survivors.shape[1] <= 2

"""bf16 with the YOLOv8 stem kept in f32: which layers, and how OpenVINO is told.

OpenVINO's CPU plugin runs every convolution in bf16 under ``INFERENCE_PRECISION_HINT=bf16``
except nodes whose runtime info carries ``DisablePrecisionConversion`` (the mark its own
transformations put on precision-sensitive nodes). Python cannot attach that attribute to a node,
but the IR reader restores it from the ``.xml``, so :func:`keep_f32` writes it into the IR text
before OpenVINO reads it.

Why the stem: bf16 keeps 8 bits of mantissa, and the rounding of the first layers' inputs and
weights (full-resolution pixels and feature maps) is carried through the whole network. Keeping
the first three layers (``model.0``–``model.2``) in f32 keeps detections within SPEC.md's bf16
tolerance (IoU ≥ 0.95, Δconf ≤ 0.02, same classes) against ultralytics predict in fp32, at a small
cost in speed; each layer fewer lets more detections out of it (docs/operations.md, Sizing, gives
the figures).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

STEM_F32 = re.compile(r"^/model\.[0-2]/")
"""Layers of an ultralytics YOLOv8 export (``/model.N/…``) kept in f32 under bf16: the stem
convolution, the second convolution and the first C2f block."""

_ATTRIBUTE = {"name": "DisablePrecisionConversion", "version": "0", "value": "dynamic:f16"}
"""The runtime attribute as OpenVINO serialises it (``ov::DisablePrecisionConversion``: no
conversion from any type to a lower precision); the CPU plugin keeps such a node's precision."""

_SKIP_TYPES = frozenset({"Parameter", "Result", "Const"})


def keep_f32(xml_text: str, layers: re.Pattern[str] = STEM_F32) -> tuple[str, int]:
    """The IR text with every layer whose name matches ``layers`` marked to stay in f32.

    Returns the new text and how many layers were marked (0: the names did not match, the IR is
    returned unchanged in meaning).
    """
    root = ET.fromstring(xml_text)
    marked = 0
    for layer in root.iter("layer"):
        if layer.get("type") in _SKIP_TYPES or not layers.search(layer.get("name", "")):
            continue
        rt_info = layer.find("rt_info")
        if rt_info is None:
            rt_info = ET.Element("rt_info")
            layer.insert(0, rt_info)
        if not any(a.get("name") == _ATTRIBUTE["name"] for a in rt_info.iter("attribute")):
            ET.SubElement(rt_info, "attribute", _ATTRIBUTE)
        marked += 1
    return ET.tostring(root, encoding="unicode"), marked

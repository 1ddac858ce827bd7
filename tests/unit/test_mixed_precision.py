"""keep_f32: which IR layers get OpenVINO's keep-precision mark (pure XML, no OpenVINO)."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

from inference_service.runtime.mixed_precision import keep_f32

IR = """<?xml version="1.0"?>
<net name="m" version="11">
  <layers>
    <layer id="0" name="images" type="Parameter" version="opset1"><output><port id="0"/></output></layer>
    <layer id="1" name="model.0.conv.weight" type="Const" version="opset1"/>
    <layer id="2" name="/model.0/conv/Conv" type="Convolution" version="opset1"/>
    <layer id="3" name="/model.2/m.0/cv1/act/Mul" type="Multiply" version="opset1">
      <rt_info><attribute name="fused_names" version="0" value="x"/></rt_info>
    </layer>
    <layer id="4" name="/model.3/conv/Conv" type="Convolution" version="opset1"/>
    <layer id="5" name="/model.22/Concat" type="Concat" version="opset1"/>
    <layer id="6" name="output0" type="Result" version="opset1"/>
  </layers>
</net>
"""


def _marked(text: str) -> dict[str, list[str]]:
    out = {}
    for layer in ET.fromstring(text).iter("layer"):
        out[layer.get("name", "")] = [
            a.get("value", "")
            for a in layer.iter("attribute")
            if a.get("name") == "DisablePrecisionConversion"
        ]
    return out


def test_the_stem_layers_are_marked_and_nothing_else() -> None:
    text, count = keep_f32(IR)
    marks = _marked(text)
    assert count == 2
    assert marks["/model.0/conv/Conv"] == ["dynamic:f16"]
    assert marks["/model.2/m.0/cv1/act/Mul"] == ["dynamic:f16"]
    for name in ("images", "model.0.conv.weight", "/model.3/conv/Conv", "/model.22/Concat"):
        assert marks[name] == [], name
    # existing runtime info is kept beside the mark
    layer = next(x for x in ET.fromstring(text).iter("layer") if x.get("id") == "3")
    assert [a.get("name") for a in layer.iter("attribute")] == [
        "fused_names",
        "DisablePrecisionConversion",
    ]


def test_marking_twice_adds_no_second_mark() -> None:
    once, _ = keep_f32(IR)
    twice, count = keep_f32(once)
    assert count == 2
    assert _marked(twice)["/model.0/conv/Conv"] == ["dynamic:f16"]


def test_a_graph_with_other_names_is_left_alone() -> None:
    text, count = keep_f32(IR, re.compile(r"^/backbone/"))
    assert count == 0
    assert all(v == [] for v in _marked(text).values())

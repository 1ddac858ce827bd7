"""Inference Service: Kafka frame tasks in, YOLOv8 detections out.

The package is layered, dependencies pointing inward:

- ``domain`` and ``errors`` (stdlib only): value types and the error tree;
- ``ports``: the Protocols the pipeline talks to (frame store, detector, ...);
- ``vision``: decode, letterbox, YOLOv8 head decode, NMS (numpy/OpenCV only);
- ``runtime``: inference backends (OpenVINO, ONNX Runtime) behind one interface;
- ``model``: resolving the one model setting into a runnable artifact;
- ``pool`` and ``pipeline``: worker processes and the ordered task pipeline;
- adapters (``kafka``, ``s3``, local files), ``http``, ``cli``;
- ``app``: the composition root that wires settings to adapters.
"""

__version__ = "0.1.0"

"""Helpers shared by the service's tests, benchmarks and scripts (not part of the service).

- :mod:`~inference_devtools.paths`: where the checkout keeps what these tools read.
- :mod:`~inference_devtools.synthetic`: the synthetic scenes of the test model's classes.
- :mod:`~inference_devtools.conformance`: comparing detections with the ultralytics reference.
- :mod:`~inference_devtools.bench`: what the benchmarks share (frames, models, machine facts).
- :mod:`~inference_devtools.reference_design`: the original design's per-frame worker.
- :mod:`~inference_devtools.settings_doc`: the generated settings block of the operations guide.

Installed editable from the checkout (``make venv``), so paths resolve into the repository.
"""

"""The engine contract and engine directories: what build_engines.py writes and the engine
backends load.

:mod:`.specs` (every stage's tensors, axes and profiles), :mod:`.manifest` (the directory),
:mod:`.tensorrt_plan` (the TensorRT plan format) and :mod:`.tensorrt_build` (the plan
builder). Nothing here reads the PyTorch models, the export code or the runtime (STYLE 2;
``tests/test_imports.py``).
"""

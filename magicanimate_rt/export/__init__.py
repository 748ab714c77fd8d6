"""Export: PyTorch stages -> ONNX graphs -> an engine directory.

Nothing is imported here eagerly: :mod:`.specs` is pure data that the engine loader and the
runtime read on machines without the PyTorch models, while :mod:`.onnx_export` and
:mod:`.build` import the models and run only where the weights are.
"""

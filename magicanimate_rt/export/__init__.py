"""Export: PyTorch stages -> ONNX graphs -> an engine directory.

The graphs are written from the stage contract in :mod:`magicanimate_rt.engines.specs`
(pure data that the engine loader and the runtime read on machines without the PyTorch
models); :mod:`.onnx_export` and :mod:`.build` import the models and run only where the
weights are. Nothing is imported here eagerly.
"""

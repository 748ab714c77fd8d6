"""Engine directories: what build_engines.py writes and the engine backends load.

Reads only :mod:`magicanimate_rt.engines.specs` and the directory's own files; never the
PyTorch models or the export code (STYLE 2).
"""

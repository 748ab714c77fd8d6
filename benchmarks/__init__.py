"""Benchmarks of the runtime: the reference schedule against the default runtime, stage by
stage, with FLOP counts and peak memory. ``python -m benchmarks.runtime_bench --help``."""

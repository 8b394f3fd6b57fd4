"""Benchmarks: each module prints its figures beside a comparison measured in the same run.

`python -m benchmarks.run [--quick]` runs them all (see benchmarks/run.py for the convention).
"""

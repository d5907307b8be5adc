"""stableopt's benchmarks: stability under faults, do-no-harm on healthy runs, LR
sensitivity, per-step overhead (not installed with the package).

Run them from a source checkout with ``python -m stableopt bench ...`` or
``python -m benchmarks ...`` (see :mod:`benchmarks.cli`).
"""

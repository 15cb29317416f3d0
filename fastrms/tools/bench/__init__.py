"""``fastrms bench`` and the ``bench/`` suite's tables, one module per concern.

- :mod:`~fastrms.tools.bench.cases`: the algorithms and the state they step from;
- :mod:`~fastrms.tools.bench.variants`: the implementations compared, and the check of their
  results against the NumPy reference;
- :mod:`~fastrms.tools.bench.ceilings`: the same-pattern memory ceilings;
- :mod:`~fastrms.tools.bench.models`: the model-shaped workloads (steps over a model's tensors);
- :mod:`~fastrms.tools.bench.measure`: checking and timing, interleaved;
- :mod:`~fastrms.tools.bench.targets`: the stated targets, met or missed;
- :mod:`~fastrms.tools.bench.render` and :mod:`~fastrms.tools.bench.plot`: the report;
- :mod:`~fastrms.tools.bench.command`: the command line.
"""

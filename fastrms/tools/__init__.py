"""Tools apart from the library: the benchmark report and the worked examples.

- :mod:`fastrms.tools.bench`: ``fastrms bench``, its cases, variants, ceilings, model workloads,
  measuring, targets, report and plots; the ``bench/`` suite uses the same tables.
- :mod:`fastrms.tools.demo`: ``fastrms demo regression`` and ``fastrms demo paths``, their test
  functions and plots.

Nothing in :mod:`fastrms` imports these modules, except the ``fastrms`` command.
"""

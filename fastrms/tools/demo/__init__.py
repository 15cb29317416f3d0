"""Worked examples: ``fastrms demo regression`` and ``fastrms demo paths``.

Both demos are plain functions returning results
(:func:`~fastrms.tools.demo.regression.fit_regression`,
:func:`~fastrms.tools.demo.paths.run_paths`); the command line
(:mod:`~fastrms.tools.demo.command`) formats them, and :mod:`~fastrms.tools.demo.plots` draws
them. Every parameter vector is a float64 NumPy array of 2 elements, updated in place by a
fastrms optimizer from a separately allocated gradient array. The optimizers and learning rates
of each demo are in :mod:`~fastrms.tools.demo.settings`, the test functions of the paths in
:mod:`~fastrms.tools.demo.testfunctions`.
"""

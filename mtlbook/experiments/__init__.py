"""Experiment drivers behind the book's chapters (one module per chapter or study).

* :mod:`mtlbook.experiments.model_family`: chapter 3, Shared-Bottom vs MMoE vs PLE on the
  MMoE synthetic generator and on census-income, gate utilisation and gradient conflict on
  the shared experts.
* :mod:`mtlbook.experiments.census_study`: chapter 3's stored census-income tables (two
  tasks with and without leaking columns, eight leakage-audited tasks), ``run_cell`` and
  ``run_table``.
* :mod:`mtlbook.experiments.study`: chapter 8, does adaTT help? A resumable grid of
  configurations x datasets x seeds (``run_grid``, ``run_cell``), its tidy results table
  (``COLUMNS``, ``load_table``) and its statistics (``t_interval``, ``paired_differences``,
  ``holm``, ``mtl_gain``, ``time_ratios``, ``verdict``).

Nothing is imported here: import the module you need, so that ``import mtlbook.experiments``
stays free (no torch, pandas or matplotlib).
"""

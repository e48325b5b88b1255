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
* :mod:`mtlbook.experiments.design`: chapter 8's verdict design, the declared contrasts that
  separate adaTT's transfer from its gate co-freeze, their Holm families and the verdict that
  names a cause (``contrast_table``, ``cause_verdict``).
* :mod:`mtlbook.experiments.inference`: exact sign-flip permutation test, TOST equivalence,
  power and minimum detectable effect of the paired t-test.
* :mod:`mtlbook.experiments.published`: census-income AUCs read in published sources, with
  their settings (chapters 3 and 8 print them beside their own).
* :mod:`mtlbook.experiments.static_weights`: the tuned static-weight baseline's search space
  and its choice on validation data.

Nothing is imported here: import the module you need, so that ``import mtlbook.experiments``
stays free (no torch, pandas or matplotlib).
"""

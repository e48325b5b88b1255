"""Diagnose your own multi-task model (chapter 9).

* :func:`diagnose` (:mod:`mtlbook.diagnose.core`): per-task gradient norms, cosines, a noise
  baseline and chapter 5's affinity, measured on any PyTorch model's shared parameters.
* :class:`GradientMonitor` (:mod:`mtlbook.diagnose.monitor`): the same inside a training loop.
* :class:`DiagnosisReport` (:mod:`mtlbook.diagnose.report`): arrays, ``summary()``, ``plot()``
  and ``findings()`` (:mod:`mtlbook.diagnose.findings`).
* :func:`split_batch` and the noise threshold (:mod:`mtlbook.diagnose.noise`).

``mtlbook.diagnose`` at the top level is the *function*; import this package's modules with
``from mtlbook.diagnose import ...``.
"""

from mtlbook.diagnose.core import diagnose
from mtlbook.diagnose.findings import Finding
from mtlbook.diagnose.monitor import GradientMonitor
from mtlbook.diagnose.noise import split_batch
from mtlbook.diagnose.report import DiagnosisReport

__all__ = ["DiagnosisReport", "Finding", "GradientMonitor", "diagnose", "split_batch"]

"""mtlbook: the package behind the executable book on conflicting gradients in multi-task learning.

Subpackages mirror the book's parts: :mod:`mtlbook.toy` (ch. 1), :mod:`mtlbook.data` and
:mod:`mtlbook.models` (ch. 2-3), :mod:`mtlbook.adatt` (ch. 4-6), :mod:`mtlbook.losses`,
:mod:`mtlbook.balancing` and :mod:`mtlbook.train` (ch. 7-8), :mod:`mtlbook.viz` (figures and
explorers). Import the subpackage you need. :func:`diagnose` and :class:`GradientMonitor`
(chapter 9) are imported here so that ``mtlbook.diagnose(...)`` works on any model.
"""

__version__ = "0.1.0"

from mtlbook.diagnose import DiagnosisReport, GradientMonitor, diagnose  # noqa: E402  (chapter 9)

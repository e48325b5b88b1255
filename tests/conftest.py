"""Shared test set-up.

Tiny models run faster on one thread, and one thread keeps timings stable on a shared
2-core machine; results do not depend on it.
"""

import matplotlib
import torch

torch.set_num_threads(1)
# in this process only: chapters run by nbval keep their inline backend
matplotlib.use("Agg")

"""Shared test set-up.

Tiny models run faster on one thread, and one thread keeps timings stable on a shared
2-core machine; results do not depend on it.
"""

import atexit
import os
import shutil
import tempfile

# torch.compile's on-disk cache (TrainerConfig.compile_forward tests): one of this session's
# own, so code compiled by another process under other CPU settings (scripts/reproducible_env.sh
# sets ATEN_CPU_CAPABILITY=avx2; a plain shell does not) is never loaded here. Set before
# torch is imported.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="mtlbook_tests_inductor_")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

import matplotlib  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)
# in this process only: chapters run by nbval keep their inline backend
matplotlib.use("Agg")

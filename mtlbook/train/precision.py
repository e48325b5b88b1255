"""Mixed precision: which autocast dtype a run uses and whether it needs a GradScaler.

``config.amp``: ``"auto"`` (fp16 on CUDA, off elsewhere), ``"off"``, ``"fp16"`` (CUDA only,
with a ``GradScaler`` against underflow) or ``"bf16"`` (any device, no scaler: bf16 has
fp32's exponent range).
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["Precision"]


class Precision:
    """The autocast context and the gradient scaler of one run."""

    def __init__(self, amp: str, device: torch.device) -> None:
        self.device = device
        if amp == "auto":
            self.dtype: torch.dtype | None = torch.float16 if device.type == "cuda" else None
        elif amp == "off":
            self.dtype = None
        elif amp == "fp16":
            if device.type != "cuda":
                raise ValueError(f"TrainerConfig.amp='fp16' needs a CUDA device, got device {device}; use 'bf16' or 'off'")
            self.dtype = torch.float16
        else:
            self.dtype = torch.bfloat16

    def autocast(self) -> contextlib.AbstractContextManager:
        """``torch.autocast`` in the run's dtype (a no-op context without AMP)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def make_scaler(self) -> torch.amp.GradScaler | None:
        """A fresh ``GradScaler`` for fp16, ``None`` otherwise (built at every phase start)."""
        return torch.amp.GradScaler("cuda") if self.dtype == torch.float16 else None

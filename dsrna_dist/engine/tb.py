"""TensorBoard writer that exists only on rank 0 (a no-op object elsewhere).

Why: several ranks writing event files into one directory produce duplicated, interleaved
curves; stage code should be able to call ``rt.tb.scalar(...)`` unconditionally.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch


class TBWriter:
    """``scalar/scalars/image/text/figure/flush/close``; inactive writers ignore every call."""

    def __init__(self, log_dir: Optional[Path], active: bool = True):
        self._w = None
        if active and log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter  # imported lazily: slow import

            self._w = SummaryWriter(log_dir=str(log_dir))

    @property
    def active(self) -> bool:
        return self._w is not None

    def scalar(self, tag: str, value: Any, step: int) -> None:
        if self._w is not None:
            if isinstance(value, torch.Tensor):
                value = value.detach().float().item()
            self._w.add_scalar(tag, float(value), int(step))

    def scalars(self, values: Mapping[str, Any], step: int, prefix: str = "") -> None:
        for k, v in values.items():
            self.scalar(prefix + k, v, step)

    def image(self, tag: str, img: Any, step: int) -> None:
        """CHW float tensor in [0,1] or HWC uint8 ndarray (or HW grayscale of either)."""
        if self._w is None:
            return
        if isinstance(img, torch.Tensor):
            t = img.detach().float().cpu().clamp(0, 1)
            if t.dim() == 2:
                t = t[None]
            self._w.add_image(tag, t, int(step), dataformats="CHW")
        else:
            a = np.asarray(img)
            if a.ndim == 2:
                a = a[:, :, None]
            self._w.add_image(tag, a, int(step), dataformats="HWC")

    def text(self, tag: str, text: str, step: int) -> None:
        if self._w is not None:
            self._w.add_text(tag, text, int(step))

    def figure(self, tag: str, fig: Any, step: int, close: bool = True) -> None:
        """Matplotlib figure; closed afterwards (on every rank, so figures never pile up)."""
        if self._w is not None:
            self._w.add_figure(tag, fig, int(step), close=close)
        elif close:
            import matplotlib.pyplot as plt

            plt.close(fig)

    def flush(self) -> None:
        if self._w is not None:
            self._w.flush()

    def close(self) -> None:
        if self._w is not None:
            self._w.flush()
            self._w.close()
            self._w = None

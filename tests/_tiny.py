"""The smallest search a CLI run can do end to end: synthetic 8x8 data, a 2-node supernet.

Shared by the search and P-DARTS CLI tests and ``bench/bench_test_runner.py`` so the three time
and check the same run.
"""
from __future__ import annotations

from typing import List


def tiny_search_args(layers: int = 3) -> List[str]:
    """CLI overrides for a search of ``layers`` cells on 96 synthetic images, 3 steps an epoch."""
    return ["--data.name=synthetic", "--data.synthetic_size=96", "--data.synthetic_shape=[3,8,8]",
            "--data.synthetic_classes=4", "--data.batch_size=8", "--data.crop_padding=1",
            "--model.init_channels=4", f"--model.layers={layers}", "--model.nodes=2",
            "--run.progress=false", "--steps_per_epoch=3"]

"""CPU seconds per search step of a search config (process time, this process's threads).

    OMP_NUM_THREADS=1 python bench/bench_search_step.py configs/search/fmnist_small_darts.yaml [steps]

Builds the config's supernet, strategy and metric, runs one warm-up step and then ``steps``
(default 2) full steps (arch step forced on: ``strategy.arch_start_epoch=0``) on a random
batch of the config's batch size and image shape; prints the mean CPU seconds per step.
Used for the fmnist_small budget in README "Convergence at CPU scale". Then the same steps
with the stride-2 ``dil_conv`` as the native ``nn.Conv2d`` instead of ``SubsampledConv2d``,
side by side (BENCHMARKS.md "CPU layout").
"""
from __future__ import annotations

import sys
import time

import torch

from dsrna_dist.config import SearchConfig, load_config
from dsrna_dist.data import dataset_info
from dsrna_dist.search import build_metric, build_optimizers
from dsrna_dist.space.supernet import Supernet
from dsrna_dist.strategies import SearchContext, build_strategy

from bench_cpu_layout import set_variant  # noqa: E402  (bench/ is sys.path[0] when run as a script)


def main() -> None:
    path = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = load_config(SearchConfig, path, {"strategy.arch_start_epoch": 0})
    info = dataset_info(cfg.data)
    model = Supernet(cfg.model, info).to(memory_format=torch.channels_last)
    w_opt, a_opt = build_optimizers(cfg, model)
    strategy = build_strategy(SearchContext(cfg=cfg, model=model, net=model, w_optim=w_opt, a_optim=a_opt,
                                            metric=build_metric(cfg)))
    bs = cfg.data.batch_size
    shape = (info.in_channels, info.image_size, info.image_size)
    x = torch.rand(bs, *shape).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, info.num_classes, (bs,))
    secs = {}
    for name, rewrite in (("SubsampledConv2d", True), ("native strided dil_conv", False)):
        set_variant(model, torch.channels_last, rewrite)
        strategy.step(x, y, x, y, epoch=0, step=0, lr=cfg.optim.lr)
        t = time.process_time()
        for i in range(n):
            strategy.step(x, y, x, y, epoch=0, step=i + 1, lr=cfg.optim.lr)
        secs[name] = (time.process_time() - t) / n
    print(f"{path}: batch {bs}, " + ", ".join(f"{k}: {v:.2f} CPU s/step" for k, v in secs.items())
          + f"; native / rewrite {secs['native strided dil_conv'] / secs['SubsampledConv2d']:.2f}x")


if __name__ == "__main__":
    main()

"""Full CROWN of this project's engine vs auto_LiRPA's on the same trained network, example and
eps: process CPU time and the margin lower bounds (min over j != y of f_y - f_j), side by side in
one process (issue 16 item 1: the cost as a ratio to auto_LiRPA's CROWN). auto_LiRPA is not a
dependency: put a checkout on PYTHONPATH (it needs appdirs, tqdm and graphviz importable).

    PYTHONPATH=/path/to/auto_LiRPA OMP_NUM_THREADS=1 python bench/bench_lirpa.py \
        --checkpoint results/grid/net/nat/97c7ea0e8a_s0/train/checkpoints/best.pt --eps 1e-5 1e-4 \
        --index 0 1 2 --pools-to-skip --lirpa-conv-mode matrix

DARTS' pools are out of auto_LiRPA's reach (stride-1 max pool, count_include_pad=False average
pool), hence --pools-to-skip; its patches mode fails on these nets, hence matrix (BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch


def lirpa_compatible(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the network that computes the same function with ops auto_LiRPA traces.

    Its Slice bound takes step 1 only and its patches mode multiplies by 4-d constants only,
    while this project's stride-2 convs subsample with x[..., ::2, ::2] (SubsampledConv2d),
    FactorizedReduce offsets with x[..., 1:, 1:] and Normalize broadcasts 3-d statistics. So:
    plain strided convs for both (the offset one as a 2x2 stride-2 kernel with its weight in the
    corner) and a depthwise 1x1 conv for the normalization."""
    import copy

    import torch.nn as nn

    from dsrna_dist.space.layers import Normalize, SubsampledConv2d
    from dsrna_dist.space.ops import FactorizedReduce

    class _Offset(nn.Module):  # conv_2(x[:, :, 1:, 1:]) of a 1x1 stride-2 conv, without a slice
        def __init__(self, conv: nn.Conv2d) -> None:
            super().__init__()
            w = torch.zeros(conv.out_channels, conv.in_channels // conv.groups, 2, 2)
            w[:, :, 1, 1] = conv.weight[:, :, 0, 0]
            self.conv = nn.Conv2d(conv.in_channels, conv.out_channels, 2, stride=2, bias=False, groups=conv.groups)
            self.conv.weight.data.copy_(w)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # even sizes, as FactorizedReduce needs
            return self.conv(x)

    class _FR(nn.Module):
        def __init__(self, fr: FactorizedReduce) -> None:
            super().__init__()
            self.relu, self.conv_1, self.conv_2, self.bn = fr.relu, _plain(fr.conv_1), _Offset(fr.conv_2), fr.bn

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.relu(x)
            return self.bn(torch.cat([self.conv_1(x), self.conv_2(x)], dim=1))

    def _plain(conv: nn.Conv2d) -> nn.Conv2d:
        out = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                        conv.dilation, conv.groups, conv.bias is not None)
        out.load_state_dict(conv.state_dict())
        return out

    def _affine(norm: Normalize) -> nn.Conv2d:  # (x - m) / s as a depthwise 1x1 conv
        c = norm.mean.numel()
        out = nn.Conv2d(c, c, 1, groups=c)
        out.weight.data.copy_((1.0 / norm.std).view(c, 1, 1, 1))
        out.bias.data.copy_(-norm.mean / norm.std)
        return out

    def swap(mod: nn.Module) -> None:
        for name, child in mod.named_children():
            if isinstance(child, Normalize):
                setattr(mod, name, _affine(child))
            elif isinstance(child, FactorizedReduce):
                setattr(mod, name, _FR(child))
            elif isinstance(child, SubsampledConv2d):
                setattr(mod, name, _plain(child))
            else:
                swap(child)

    out = copy.deepcopy(model)
    swap(out)
    return out.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--eps", type=float, nargs="+", default=[1e-4])
    ap.add_argument("--norm", default="inf", choices=["inf", "2"])
    ap.add_argument("--index", type=int, nargs="+", default=[0], help="test image indices")
    ap.add_argument("--engines", default="ours,lirpa")
    ap.add_argument("--lirpa-conv-mode", default="patches", choices=["patches", "matrix"],
                    help="auto_LiRPA's conv representation (patches: its fast default)")
    ap.add_argument("--pools-to-skip", action="store_true", help="auto_LiRPA bounds neither a max pool "
                    "with stride != kernel (DARTS' 3x3 stride-1 pools) nor count_include_pad=False average "
                    "pools: rebuild the network with every pool op replaced by skip_connect, keeping the "
                    "trained weights that fit (the replacements are fresh; a different function, for cost only)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from dsrna_dist.bounds import BoundedModel, margin_spec
    from dsrna_dist.config import DataConfig
    from dsrna_dist.data.base import load_arrays
    from dsrna_dist.space.network import load_trained

    model, tcfg, geno = load_trained(args.checkpoint, "cpu")
    if args.pools_to_skip:
        import dataclasses

        from dsrna_dist.data import dataset_info
        from dsrna_dist.space.network import build_network

        swap = lambda cell: tuple(("skip_connect" if op.endswith("pool_3x3") else op, i) for op, i in cell)  # noqa: E731
        geno = dataclasses.replace(geno, normal=swap(geno.normal), reduce=swap(geno.reduce))
        trained = model.state_dict()
        model = build_network(tcfg.model, geno, dataset_info(tcfg.data.name))
        own = model.state_dict()
        model.load_state_dict({k: v for k, v in trained.items() if k in own and own[k].shape == v.shape}, strict=False)
        print(json.dumps({"genotype": geno.to_dict()}), flush=True)
    model.eval()
    arr = load_arrays(DataConfig(name=tcfg.data.name), "test")
    engines = args.engines.split(",")
    ours = BoundedModel(model) if "ours" in engines else None
    lirpa = None
    for i in args.index:
        x = arr.images[i:i + 1].float() / 255.0
        y = arr.labels[i:i + 1]
        c = margin_spec(y, int(model(x).shape[1]))  # rows e_y - e_j, the spec our engine bounds too
        for eps in args.eps:
            row = {"index": i, "label": int(y), "eps": eps, "norm": args.norm, "lirpa_conv_mode": args.lirpa_conv_mode}
            if ours is not None:
                t0 = time.process_time()
                with torch.no_grad():
                    m = ours.margin_lower_bound(x, y, eps, args.norm, "crown")
                row["ours_cpu_s"] = time.process_time() - t0
                row["ours_margin_min"] = float(m.scatter(1, y.view(-1, 1), math.inf).min())
            if "lirpa" in engines:
                from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm

                if lirpa is None:
                    t0 = time.process_time()
                    net = lirpa_compatible(model)
                    with torch.no_grad():  # the same function, or the comparison means nothing
                        probe = arr.images[:64].float() / 255.0
                        diff = float((net(probe) - model(probe)).abs().max())
                    assert diff < 1e-4, f"auto_LiRPA copy differs from the network by {diff}"
                    lirpa = BoundedModule(net, torch.zeros_like(x), device="cpu", verbose=0,
                                          bound_opts={"conv_mode": args.lirpa_conv_mode})
                    row["lirpa_build_cpu_s"] = time.process_time() - t0
                if args.norm == "inf":
                    ptb = PerturbationLpNorm(norm=math.inf, eps=eps, x_L=(x - eps).clamp(0, 1), x_U=(x + eps).clamp(0, 1))
                else:  # auto_LiRPA's l_2 ball has no [0, 1] box: a superset of ours, so its bound is looser or equal
                    ptb = PerturbationLpNorm(norm=2.0, eps=eps)
                t0 = time.process_time()
                with torch.no_grad():
                    lb, _ = lirpa.compute_bounds(x=(BoundedTensor(x, ptb),), C=c, method="CROWN", bound_upper=False)
                row["lirpa_cpu_s"] = time.process_time() - t0
                row["lirpa_margin_min"] = float(lb.min())
            if "ours_cpu_s" in row and "lirpa_cpu_s" in row:
                row["time_ratio_ours_to_lirpa"] = row["ours_cpu_s"] / row["lirpa_cpu_s"]
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

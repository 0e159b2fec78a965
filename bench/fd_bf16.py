"""Why the finite-difference Jacobian estimate (DSRNA-Jacobian fast) runs in fp32 under autocast.

On three trained grid nets (pbn, seed 0; the ones BENCHMARKS records), the estimate of ||J(x_i)||_F^2 from differences of bf16 logits
(what the fused path did under `mixed_precision: bf16`) against the same differences in fp32, at
two steps h; and the library's `frobenius_sq_fd` under bf16 autocast, which must equal fp32.
CPU autocast (bf16 conv / linear), one thread:

    OMP_NUM_THREADS=1 python bench/fd_bf16.py [--nets 3fe52b6e22_s0 ...] [--n 64]
"""
from __future__ import annotations

import argparse

import torch

from dsrna_dist.config import EvalConfig, load_config
from dsrna_dist.evaluate import preflight
from dsrna_dist.robustness.jacobian import fd_frobenius_sq, fd_inputs, first_logits, frobenius_sq_fd


def differences(net: torch.nn.Module, x: torch.Tensor, h: float, bf16: bool) -> torch.Tensor:
    """[B] estimate from one direction per example, the logits computed in bf16 or fp32."""
    g = torch.Generator().manual_seed(0)
    xs = torch.cat([x, fd_inputs(x, 1, h, generator=g)])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        f = first_logits(net(xs)).float()
    return fd_frobenius_sq(f[:len(x)], f[len(x):], h)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nets", nargs="+", default=["3fe52b6e22_s0", "82f0d2a530_s0", "8de21812fc_s0"])
    ap.add_argument("--n", type=int, default=64)
    a = ap.parse_args()
    torch.set_num_threads(1)
    print("| net | h | mean |logit| | mean fp32 | mean bf16 | per-example rel. error, median / max | frobenius_sq_fd under bf16 = fp32 |")
    print("|---|---|---|---|---|---|---|")
    for ck in (f"results/grid/net/pbn/{n}/train/checkpoints/best.pt" for n in a.nets):
        cfg = load_config(EvalConfig, "configs/eval/fmnist_small_grid.yaml", {"checkpoint": ck, "data.test_subset": a.n})
        plan = preflight(cfg)
        net = plan.model.eval()
        x = plan.data.x(list(range(a.n)), torch.device("cpu"))
        with torch.no_grad():
            scale = float(net(x).abs().mean())
        for h in (0.01, 0.05):
            ref, low = differences(net, x, h, False), differences(net, x, h, True)
            rel = (low - ref).abs() / ref.abs().clamp_min(1e-12)
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                lib, _ = frobenius_sq_fd(net, x, 1, h, generator=torch.Generator().manual_seed(0))
            same = torch.allclose(lib, ref, rtol=1e-5)
            print(f"| {ck.split('/')[4]} | {h} | {scale:.2f} | {ref.mean():.4g} | {low.mean():.4g} | "
                  f"{rel.median():.3f} / {rel.max():.3f} | {same} |")


if __name__ == "__main__":
    main()

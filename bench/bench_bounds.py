"""Bound-engine throughput and peak memory: IBP vs CROWN-IBP vs CROWN on a derived network.

Each method runs in its own subprocess (so peak RSS / CUDA peak memory is per method), on the
same derived DARTS_V2 network (dsrna_dist.space.network, eval mode, random weights) and the same
inputs; the table prints examples/s, peak memory, and both as ratios to IBP, side by side.
``crown-ibp+grad`` is the search-time use: margin bound plus a backward pass to all parameters.

    python bench/bench_bounds.py                      # quick default (8 cells, C=4, 8x8x3)
    python bench/bench_bounds.py --image-size 32 --init-channels 16 --batch 32 --methods ibp,crown-ibp,crown-ibp+grad
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import types


def _build(args):
    import torch
    from dsrna_dist.config import NetworkConfig
    from dsrna_dist.space.network import build_network

    torch.manual_seed(0)
    info = types.SimpleNamespace(name="synthetic", image_size=args.image_size, in_channels=args.in_channels,
                                 num_classes=10, mean=(0.5,) * args.in_channels, std=(0.25,) * args.in_channels)
    cfg = NetworkConfig(genotype="DARTS_V2", init_channels=args.init_channels, layers=args.layers,
                        auxiliary=False)
    return build_network(cfg, "DARTS_V2", info).to(args.device).eval()


def child(args) -> None:
    import torch
    from dsrna_dist.bounds import BoundedModel

    torch.set_num_threads(args.threads)
    model = _build(args)
    method = args.child
    batch = args.crown_batch if method == "crown" else args.batch
    x = torch.rand(batch, args.in_channels, args.image_size, args.image_size, device=args.device)
    y = torch.randint(0, 10, (batch,), device=args.device)
    bm = BoundedModel(model, max_memory_mb=args.max_memory_mb)
    cuda = args.device.startswith("cuda")

    def once():
        if method == "forward":
            with torch.no_grad():
                model(x)
        elif method.endswith("+grad"):
            bm.margin_lower_bound(x, y, args.eps, args.norm, method[:-5]).sum().backward()
        else:
            with torch.no_grad():
                bm.margin_lower_bound(x, y, args.eps, args.norm, method)

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    once()  # warm-up
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(args.repeats):
        once()
    if cuda:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / args.repeats
    peak = (torch.cuda.max_memory_allocated() / 2 ** 20 if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base)
    print(json.dumps({"method": method, "ex_per_s": batch / dt, "peak_mb": peak, "batch": batch}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-size", type=int, default=8)
    p.add_argument("--in-channels", type=int, default=3)
    p.add_argument("--init-channels", type=int, default=4)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--crown-batch", type=int, default=1, help="examples for full CROWN (quadratic cost)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--eps", type=float, default=1 / 255)
    p.add_argument("--norm", default="inf", choices=("inf", "2"))
    p.add_argument("--methods", default="forward,ibp,crown-ibp,crown-ibp+grad,crown")
    p.add_argument("--max-memory-mb", type=float, default=256.0)
    p.add_argument("--threads", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    p.add_argument("--device", default="cpu")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    rows = []
    for m in args.methods.split(","):
        cmd = [sys.executable, __file__, "--child", m] + [a for a in sys.argv[1:]]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            print(f"{m}: failed\n{out.stderr.strip().splitlines()[-1] if out.stderr else ''}")
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    ref = next((r for r in rows if r["method"] == "ibp"), rows[0] if rows else None)
    print(f"derived DARTS_V2, {args.layers} cells, C={args.init_channels}, "
          f"{args.in_channels}x{args.image_size}x{args.image_size}, eps={args.eps:.4g} l_{args.norm}, "
          f"device={args.device}, threads={args.threads}")
    print(f"{'method':<16}{'batch':>6}{'ex/s':>12}{'x IBP':>8}{'peak MB':>10}{'x IBP':>8}")
    for r in rows:
        print(f"{r['method']:<16}{r['batch']:>6}{r['ex_per_s']:>12.2f}{r['ex_per_s'] / ref['ex_per_s']:>8.3f}"
              f"{r['peak_mb']:>10.1f}{r['peak_mb'] / max(ref['peak_mb'], 1e-9):>8.2f}")


if __name__ == "__main__":
    main()

"""Retraining throughput on this machine, measured side by side in one run.

1. images/s of one training step (forward + aux head + backward + SGD) of the derived
   Fashion-MNIST (1x28x28) and CIFAR (3x32x32) networks, single process;
2. the engine overhead: the same step under DDP (Accelerate-style, gloo on CPU) and under
   DeepSpeed ZeRO-2, 2 ranks each (torchrun), printed as the ratio ZeRO-2 / DDP step time.

    .venv/bin/python bench/bench_train.py --quick      # ~2 min on 2 busy cores
    .venv/bin/python bench/bench_train.py              # the DARTS-size networks (C=36, 20 cells)

3. ``--regimes``: the cost of one adversarial-training step (PGD-k AT, TRADES with k inner
   steps, through the train stage's own regime code) as a ratio to a natural step of the same
   network, measured in the same process, interleaved, process CPU time (one thread), best of
   ``--repeats`` rounds. The floor for PGD-k AT is about k+1 (k input-gradient passes, one
   training pass); TRADES adds a clean forward and trains on a double batch. Certified
   training (``ibp``; ``crown_ibp`` at the start of its ramp, beta = 1, where it is dearest)
   adds one bound pass of the project's engine to the training forward. Mid-ramp rows (eps 0.05
   of 0.1; crown_ibp's beta 0.5, so both bound passes) with and without the bound-balance
   regulariser of Shi et al. (``regime.bound_reg``) give its cost; ``--certified`` skips PGD.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_train.py --regimes --certified --quick --repeats 2 --steps 3

    .venv/bin/python bench/bench_train.py --regimes --quick --k 7

Inputs are random tensors (no loader cost): this isolates the model and the engine.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dsrna_dist.config import NetworkConfig  # noqa: E402
from dsrna_dist.space.network import build_network, count_parameters  # noqa: E402

INFOS = {
    "fashion_mnist": SimpleNamespace(name="fashion_mnist", in_channels=1, image_size=28, num_classes=10,
                                     mean=(0.286,), std=(0.353,)),
    "cifar10": SimpleNamespace(name="cifar10", in_channels=3, image_size=32, num_classes=10,
                               mean=(0.491, 0.482, 0.447), std=(0.247, 0.243, 0.262)),
}


def make(dataset: str, c: int, layers: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_network(NetworkConfig(genotype="DARTS_V2", init_channels=c, layers=layers), None,
                         INFOS[dataset]).train()


def step_fn(model, opt, x, y, backward=None, step=None):
    logits, aux = model(x, drop_prob=0.2)
    loss = F.cross_entropy(logits, y) + 0.4 * F.cross_entropy(aux, y)
    if backward is None:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
    else:
        backward(loss)
        step()


def timed(fn, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        fn()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t) / steps


def single(args) -> dict:
    out = {}
    for ds in ("fashion_mnist", "cifar10"):
        m = make(ds, args.c, args.layers)
        info = INFOS[ds]
        x = torch.rand(args.batch, info.in_channels, info.image_size, info.image_size)
        y = torch.randint(0, 10, (args.batch,))
        opt = torch.optim.SGD(m.parameters(), lr=0.025, momentum=0.9, weight_decay=3e-4)
        sec = timed(lambda: step_fn(m, opt, x, y), args.warmup, args.steps)
        out[ds] = {"img_per_s": args.batch / sec, "step_s": sec, "params": count_parameters(m)}
    return out


def regimes(args, fmt: torch.memory_format = torch.contiguous_format) -> dict:
    """CPU seconds per step for natural / PGD-k AT / TRADES-k, interleaved, best of repeats,
    with the network and batch in memory layout ``fmt``."""
    from dataclasses import replace

    from dsrna_dist.config import RegimeConfig, TrainConfig
    from dsrna_dist.training import build_regime

    torch.manual_seed(0)
    ncfg = NetworkConfig(genotype=args.genotype, init_channels=args.c, layers=args.layers, auxiliary=False,
                         drop_path=0.0)
    m = build_network(ncfg, None, INFOS["fashion_mnist"]).train().to(memory_format=fmt)
    x = torch.rand(args.batch, 1, 28, 28).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (args.batch,))
    opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=3e-4)
    crit = torch.nn.CrossEntropyLoss()
    k = args.k
    cfgs = {"natural": RegimeConfig(),
            f"pgd_at PGD-{k}": RegimeConfig(name="pgd_at", eps=0.1, steps=k),
            f"trades PGD-{k}": RegimeConfig(name="trades", eps=0.1, steps=k),
            "ibp": RegimeConfig(name="ibp", eps=0.1, ibp_init=False),
            "crown_ibp (beta 1)": RegimeConfig(name="crown_ibp", eps=0.1, warmup_epochs=1e9, ibp_init=False),
            # mid-ramp (eps 0.05 of 0.1), where the bound-balance regulariser is on; same eps without it
            "ibp mid-ramp": RegimeConfig(name="ibp", eps=0.1, warmup_epochs=2, ibp_init=False),
            "ibp mid-ramp +reg": RegimeConfig(name="ibp", eps=0.1, warmup_epochs=2, ibp_init=False, bound_reg=0.5),
            "crown_ibp mid-ramp": RegimeConfig(name="crown_ibp", eps=0.1, warmup_epochs=2, ibp_init=False),
            "crown_ibp mid-ramp +reg": RegimeConfig(name="crown_ibp", eps=0.1, warmup_epochs=2, ibp_init=False,
                                                    bound_reg=0.5)}
    if args.certified:
        cfgs = {n: c for n, c in cfgs.items() if c.name in ("natural", "ibp", "crown_ibp")}
    tcfg = replace(TrainConfig(), model=ncfg)
    regs = {n: build_regime(replace(tcfg, regime=c)) for n, c in cfgs.items()}

    def step(reg):
        out = reg.loss(m, m, x, y, drop_prob=0.0, epoch=0, step=0, steps_per_epoch=1, crit=crit)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 5.0)
        opt.step()

    best = {n: float("inf") for n in regs}
    for n, reg in regs.items():
        for _ in range(args.warmup):
            step(reg)
    for _ in range(args.repeats):
        for n, reg in regs.items():
            t = time.process_time()
            for _ in range(args.steps):
                step(reg)
            best[n] = min(best[n], (time.process_time() - t) / args.steps)
    return best


def worker(args) -> None:
    """One rank of the 2-rank engine comparison (started by torchrun)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    m = make(args.dataset, args.c, args.layers)
    info = INFOS[args.dataset]
    g = torch.Generator().manual_seed(rank)
    x = torch.rand(args.batch, info.in_channels, info.image_size, info.image_size, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    opt = torch.optim.SGD(m.parameters(), lr=0.025, momentum=0.9, weight_decay=3e-4)
    if args.worker == "ddp":
        ddp = torch.nn.parallel.DistributedDataParallel(m)
        fn = lambda: step_fn(ddp, opt, x, y)  # noqa: E731
    else:
        from dsrna_dist.engine import deepspeed_engine as DS
        eng = DS.initialize(m, opt, DS.ds_config(micro_batch=args.batch, world_size=dist.get_world_size(),
                                                 zero_stage=2, grad_clip=5.0))
        fn = lambda: step_fn(eng, None, x, y, eng.backward, eng.step)  # noqa: E731
    sec = timed(fn, args.warmup, args.steps)
    t = torch.tensor([sec])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if rank == 0:
        print("RESULT " + json.dumps({"engine": args.worker, "step_s": t.item(),
                                      "img_per_s": 2 * args.batch / t.item()}), flush=True)
    dist.destroy_process_group()


def launch(args, engine: str) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.abspath(__file__), "--worker", engine, "--dataset", args.dataset, "--c", str(args.c),
           "--layers", str(args.layers), "--batch", str(args.batch), "--steps", str(args.steps),
           "--warmup", str(args.warmup)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{engine} run failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small network, few steps")
    ap.add_argument("--c", type=int, default=None, help="init channels (default 36, quick 8)")
    ap.add_argument("--layers", type=int, default=None, help="cells (default 20, quick 5)")
    ap.add_argument("--batch", type=int, default=None, help="per-process batch (default 64, quick 32)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 10, quick 4)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=None, help="alternating launches per engine (default 2, quick 1)")
    ap.add_argument("--dataset", default="fashion_mnist", choices=sorted(INFOS), help="engine comparison network")
    ap.add_argument("--worker", choices=("ddp", "deepspeed"), help=argparse.SUPPRESS)
    ap.add_argument("--regimes", action="store_true", help="only the adversarial-training step-cost ratios")
    ap.add_argument("--k", type=int, default=7, help="--regimes: PGD steps of the training attack")
    ap.add_argument("--certified", action="store_true", help="--regimes: natural and certified regimes only")
    ap.add_argument("--genotype", default="DARTS_V2", help="--regimes: cell (zoo name or genotype.json)")
    ap.add_argument("--layout", default="channels_last", choices=("contiguous", "channels_last", "both"),
                    help="--regimes: memory layout(s) to time (both: side by side, with the ratio)")
    args = ap.parse_args()
    q = args.quick
    args.c = args.c or (8 if q else 36)
    args.layers = args.layers or (5 if q else 20)
    args.batch = args.batch or (32 if q else 64)
    args.steps = args.steps or (4 if q else 10)
    args.repeats = args.repeats or (1 if q else 2)
    if args.worker:
        worker(args)
        return
    torch.set_num_threads(1)  # as each rank of the engine comparison; 2 threads thrash a shared box
    if args.regimes:
        print(f"training regimes, derived {args.genotype} C={args.c}, {args.layers} cells, no aux head, Fashion-MNIST "
              f"batch {args.batch}, eps 0.1 l_inf, 1 thread, process CPU time, best of {args.repeats} interleaved "
              f"rounds of {args.steps} steps")
        fmts = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
        res = {name: regimes(args, fmt) for name, fmt in fmts.items() if args.layout in (name, "both")}
        for name, r in res.items():
            print(f" {name}:")
            for n, sec in r.items():
                print(f"  {n:24s} {sec * 1e3:8.0f} ms/step  ratio to natural {sec / r['natural']:5.2f}")
        if len(res) == 2:
            print(" contiguous / channels_last step time: " + ", ".join(
                f"{n} {res['contiguous'][n] / res['channels_last'][n]:.2f}x" for n in res["contiguous"]))
        return
    print(f"derived DARTS_V2 networks, C={args.c}, {args.layers} cells, batch {args.batch}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    res = single(args)
    for ds, r in res.items():
        print(f"  {ds:14s} {r['img_per_s']:8.1f} img/s  ({r['step_s'] * 1e3:.0f} ms/step, {r['params'] / 1e6:.3f}M params)")
    print(f"  ratio cifar10 / fashion_mnist step time: {res['cifar10']['step_s'] / res['fashion_mnist']['step_s']:.2f}")
    print(f"engines, 2 ranks x batch {args.batch} ({args.dataset}), gloo, 1 thread per rank, "
          f"best of {args.repeats}:")
    runs = {"ddp": [], "deepspeed": []}
    for _ in range(args.repeats):  # alternate, keep each engine's best: a busy box adds noise
        for engine in runs:
            runs[engine].append(launch(args, engine))
    ddp, ds = (min(runs[e], key=lambda r: r["step_s"]) for e in ("ddp", "deepspeed"))
    for r in (ddp, ds):
        print(f"  {r['engine']:10s} {r['img_per_s']:8.1f} img/s  ({r['step_s'] * 1e3:.0f} ms/step)")
    print(f"  overhead ratio DeepSpeed ZeRO-2 / DDP step time: {ds['step_s'] / ddp['step_s']:.3f}")


if __name__ == "__main__":
    main()

"""Data-loading benchmarks, each measured side by side in one run and printed as ratios.

1. MemoryLoader overhead: a training step of a small CNN fed by MemoryLoader (crop + flip
   augmentation) vs the same steps on one pre-made batch; overhead = extra time / loop time.
   Target: < 2% of the step time.
2. FFCV vs torchvision DataLoader on the same JPEG images (RandomResizedCrop + flip, uint8
   out, same batch size and worker count): images/s of each, after a warm-up epoch (FFCV's
   numba compile). Target: FFCV >= 2x.

    python bench/bench_loader.py                       # short default run (< 1 min on 2 cores)
    python bench/bench_loader.py --device cuda --mem-batch 512 --jpeg-n 8192 --workers 8
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dsrna_dist.config import DataConfig  # noqa: E402
from dsrna_dist.data import Augment, MemoryLoader  # noqa: E402
from dsrna_dist.data.synthetic import make_synthetic  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def small_cnn(c: int, k: int, width: int) -> nn.Module:
    def block(i: int, o: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True))

    return nn.Sequential(block(c, width), block(width, width), nn.MaxPool2d(2), block(width, 2 * width),
                         block(2 * width, 2 * width), nn.MaxPool2d(2), block(2 * width, 4 * width),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, k))


def bench_memory(args: argparse.Namespace, device: torch.device) -> None:
    x, y = make_synthetic(args.mem_n, 3, 32, 10, seed=0, split="train")
    torch.manual_seed(0)
    model = small_cnn(3, 10, args.width).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step(xb: torch.Tensor, yb: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()

    loader = MemoryLoader(x, y, args.mem_batch, shuffle=True, seed=0, drop_last=True, device=device,
                          augment=Augment(crop_padding=4, flip=True))
    steps = min(args.steps, len(loader))
    fixed = next(iter(loader))

    def run_loader(epoch: int) -> float:
        loader.set_epoch(epoch)
        sync(device)
        t = time.perf_counter()
        for i, (xb, yb) in enumerate(loader):
            if i == steps:
                break
            step(xb, yb)
        sync(device)
        return time.perf_counter() - t

    def run_fixed() -> float:
        sync(device)
        t = time.perf_counter()
        for _ in range(steps):
            step(*fixed)
        sync(device)
        return time.perf_counter() - t

    def run_data_only(epoch: int) -> float:
        loader.set_epoch(epoch)
        sync(device)
        t = time.perf_counter()
        for i, _ in enumerate(loader):
            if i == steps:
                break
        sync(device)
        return time.perf_counter() - t

    run_loader(0), run_fixed()  # warm-up
    with_loader, without, data_only = [], [], []
    for r in range(args.repeats):  # interleaved, best-of: robust to a busy machine
        with_loader.append(run_loader(r + 1))
        without.append(run_fixed())
        data_only.append(run_data_only(r + 1))
    t_with, t_without, t_data = min(with_loader), min(without), min(data_only)
    print(f"[memory] device={device} batch={args.mem_batch} steps={steps} width={args.width} (best of {args.repeats})")
    print(f"  train step on a fixed batch: {1e3 * t_without / steps:.2f} ms/step")
    print(f"  train step fed by MemoryLoader: {1e3 * t_with / steps:.2f} ms/step")
    print(f"  MemoryLoader alone (index + crop + flip + float): {1e3 * t_data / steps:.3f} ms/batch")
    print(f"  overhead (loop with loader - fixed) / loop with loader: {100 * max(t_with - t_without, 0) / t_with:.2f}%")
    print(f"  loader-alone time / train-step time: {100 * t_data / t_without:.2f}%   (target < 2%)")


def make_jpegs(root: str, n: int, size: int, classes: int = 10) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 256, (classes, 8, 8, 3), dtype=np.uint8)
    for i in range(n):
        k = i % classes
        d = os.path.join(root, "train", f"n{k:08d}")
        os.makedirs(d, exist_ok=True)
        img = Image.fromarray(coarse[k]).resize((size, size), Image.BILINEAR)
        noise = rng.integers(-20, 21, (size, size, 3))
        arr = np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(os.path.join(d, f"{i}.JPEG"), quality=90)


def bench_jpeg(args: argparse.Namespace, device: torch.device) -> None:
    from dsrna_dist.data import build_train_loader
    from dsrna_dist.data.ffcv_write import write_beton

    with tempfile.TemporaryDirectory(dir=args.tmp or None) as tmp:
        root = os.path.join(tmp, "imnet")
        t = time.perf_counter()
        make_jpegs(root, args.jpeg_n, args.jpeg_size)
        os.makedirs(os.path.join(root, "val"), exist_ok=True)
        cfg = DataConfig(name="imagenet", root=root, image_size=args.crop, batch_size=args.batch,
                         num_workers=args.workers, ffcv_dir=tmp, ffcv_max_resolution=args.jpeg_size, flip=True)
        write_beton(cfg, "train", os.path.join(tmp, "imagenet_train.beton"), num_workers=args.workers)
        print(f"[jpeg] {args.jpeg_n} JPEGs {args.jpeg_size}px -> RandomResizedCrop {args.crop} + flip, "
              f"batch {args.batch}, {args.workers} workers, device={device} (setup {time.perf_counter() - t:.1f}s)")
        results = {}
        for backend in ("torchvision", "ffcv"):
            from dataclasses import replace

            loader = build_train_loader(replace(cfg, loader=backend), 0, 1, device, seed=0)
            rates = []
            for epoch in range(args.epochs + 1):  # epoch 0 = warm-up (worker start, numba compile)
                loader.set_epoch(epoch)
                sync(device)
                t = time.perf_counter()
                n = 0
                for xb, _ in loader:
                    n += xb.shape[0]
                sync(device)
                if epoch > 0:
                    rates.append(n / (time.perf_counter() - t))
            results[backend] = max(rates)
            print(f"  {backend:11s}: {results[backend]:10.0f} img/s (best of {args.epochs} epochs)")
            del loader
        print(f"  FFCV / torchvision: {results['ffcv'] / results['torchvision']:.2f}x   (target >= 2x)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--mem-n", type=int, default=2048, help="images held by MemoryLoader")
    p.add_argument("--mem-batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=5, help="train steps per timed loop")
    p.add_argument("--width", type=int, default=16, help="CNN base width")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--jpeg-n", type=int, default=1024, help="JPEG images for the FFCV/torchvision comparison")
    p.add_argument("--jpeg-size", type=int, default=64, help="side of the stored JPEGs")
    p.add_argument("--crop", type=int, default=56, help="RandomResizedCrop output size")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2, help="timed epochs per JPEG backend (after a warm-up)")
    p.add_argument("--tmp", default="", help="where the temporary JPEGs and .beton go")
    p.add_argument("--skip", choices=("", "memory", "jpeg"), default="", help="skip one benchmark")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.skip != "memory":
        bench_memory(args, device)
    if args.skip != "jpeg":
        try:
            from dsrna_dist.data.ffcv_loader import require_ffcv

            require_ffcv()
        except Exception as e:  # noqa: BLE001
            print(f"[jpeg] skipped: {e}")
            return
        bench_jpeg(args, device)


if __name__ == "__main__":
    main()

"""Prepare what `bench/gpu_check.sh` needs on a device machine, here, before the call.

Why: the device tool sends the tracked tree plus carried paths, 64 MiB in all, and the tracked
tree (mostly `results/grid` checkpoints) is ~61 MiB, so the full Fashion-MNIST (30 MB) cannot
travel. The check's stages read at most 2048 train and 1000 test images, and the loader takes
the first N (`data/build._subset_indices`), so a real-format copy holding the first images of
each split gives the same data. Wheels of packages missing from the device image go to `.whl`.

    python bench/gpu_prepare.py [--src /usr/share/datasets/fashion-mnist] [--train 3000 --test 1000]
"""
from __future__ import annotations

import argparse
import gzip
import pathlib
import struct
import subprocess
import sys

from dsrna_dist.data.idx import parse_idx, read_bytes


def truncate_idx(src: pathlib.Path, dst: pathlib.Path, n: int) -> None:
    """Write the first ``n`` records of an idx(.gz) file with its header count set to ``n``
    (read and validated by the loader's own IDX reader)."""
    raw = read_bytes(str(src))
    arr = parse_idx(raw, str(src), raw[3])
    if n > len(arr):
        raise SystemExit(f"{src}: holds {len(arr)} records, fewer than {n}")
    with gzip.open(dst, "wb") as f:
        f.write(raw[:4] + struct.pack(f">{arr.ndim}I", n, *arr.shape[1:]) + arr[:n].tobytes())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--out", default=".gpudata")
    ap.add_argument("--train", type=int, default=3000)
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--wheels", nargs="*", default=["fire", "termcolor"])
    a = ap.parse_args()
    out = pathlib.Path(a.out)
    out.mkdir(exist_ok=True)
    for split, n in (("train", a.train), ("t10k", a.test)):
        for kind in ("images-idx3", "labels-idx1"):
            name = f"{split}-{kind}-ubyte.gz"
            truncate_idx(pathlib.Path(a.src) / name, out / name, n)
    if a.wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--python-version", "3.12", "--implementation", "cp",
                        "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux2014_x86_64",
                        "-d", ".whl", *a.wheels], check=True)
    print(f"{out}: first {a.train} train / {a.test} test images; .whl: {', '.join(a.wheels)}")


if __name__ == "__main__":
    main()

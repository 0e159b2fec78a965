"""FFCV backend: the writer's .beton read back exactly, rank sharding, JPEG path, errors.

Ranks are simulated by building one loader per rank argument (our sharding is an FFCV
traversal order that needs no process group).
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from dsrna_dist.config import DataConfig, replace
from dsrna_dist.data import DataError, build_eval_loader, build_train_loader, dedupe_by_index, load_arrays

ffcv = pytest.importorskip("ffcv", reason="ffcv not installed (pip install 'dsrna_dist[ffcv]')")

from dsrna_dist.data.ffcv_loader import FFCVLoader, progressive_resolution, require_ffcv  # noqa: E402
from dsrna_dist.data.ffcv_write import write_beton  # noqa: E402

torch.set_num_threads(1)
# numba (under ffcv) leaves a harmless KeyError in a dispatcher finalizer at interpreter cleanup
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_cfg(tmp_path, **kw):
    base = dict(name="synthetic", synthetic_size=45, synthetic_test_size=37, synthetic_shape=(3, 8, 8),
                loader="ffcv", ffcv_dir=str(tmp_path), batch_size=4, eval_batch_size=6, num_workers=1)
    base.update(kw)
    return DataConfig(**base)


@pytest.fixture(scope="module")
def betons(tmp_path_factory):
    d = tmp_path_factory.mktemp("betons")
    cfg = small_cfg(d)
    for split in ("train", "test"):
        write_beton(cfg, split, os.path.join(d, f"synthetic_{split}.beton"))
    return d, cfg


def test_beton_reads_back_exactly_and_eval_ranks_cover_each_index_once(betons):
    d, cfg = betons
    truth = load_arrays(cfg, "test")
    seen = []
    for rank in range(3):
        ld = FFCVLoader(os.path.join(d, "synthetic_test.beton"), 6, kind="raw", shuffle=False, seed=0, rank=rank,
                        world_size=3, drop_last=False, cover_all=True, device="cpu", num_workers=1,
                        with_index=True)
        batches = list(ld)
        assert len(batches) == len(ld)
        x = torch.cat([b[0] for b in batches])
        y = torch.cat([b[1] for b in batches])
        idx = torch.cat([b[2] for b in batches])
        assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
        assert torch.equal((x * 255).round().to(torch.uint8), truth.images[idx])
        assert torch.equal(y, truth.labels[idx])
        assert idx.tolist() == ld.indices.tolist()
        seen += idx.tolist()
    assert sorted(seen) == list(range(37))  # exactly once: no padding duplicates


def test_ffcv_train_loader_shards_and_reshuffles(betons):
    d, cfg = betons
    truth = load_arrays(cfg, "train")
    cfg = replace(cfg, crop_padding=0, flip=False)  # no augmentation: pixels must match the indices
    orders = []
    for rank in range(2):
        ld = build_train_loader(cfg, rank, 2, "cpu", seed=7)
        assert len(ld) == (45 // 2) // 4
        per_epoch = []
        for epoch in (0, 1):
            ld.set_epoch(epoch)
            xs, ys = zip(*list(ld))
            x, y = torch.cat(xs), torch.cat(ys)
            assert len(y) == len(ld) * 4
            # find each image in the truth set; labels must agree
            flat = truth.images.view(len(truth.images), -1).float()
            pos = torch.cdist((x * 255).round().view(len(x), -1), flat).argmin(1)
            assert torch.equal((x * 255).round().to(torch.uint8), truth.images[pos])
            assert torch.equal(y, truth.labels[pos])
            assert pos.tolist() == ld.indices.tolist()
            per_epoch.append(pos.tolist())
        assert per_epoch[0] != per_epoch[1]
        orders.append(per_epoch[0])
    assert not set(orders[0]) & set(orders[1])  # ranks disjoint


def test_ffcv_augmented_and_split_indices(betons):
    d, cfg = betons
    cfg = replace(cfg, crop_padding=2, flip=True, cutout=2)
    idx = np.arange(0, 45, 3)  # 15 examples
    ld = build_train_loader(cfg, 0, 1, "cpu", seed=0, indices=idx)
    assert len(ld) == 15 // 4
    truth = load_arrays(cfg, "train").labels[torch.as_tensor(idx)]
    ys = torch.cat([y for _, y in ld])
    assert set(ys.tolist()) <= set(truth.tolist())


def test_jpeg_imagenet_beton_eval_and_progressive_train(tmp_path):
    from test_data import COLORS, write_jpeg_tree

    root = tmp_path / "imnet"
    write_jpeg_tree(str(root), per_class=3, size=(48, 40))
    cfg = DataConfig(name="imagenet", root=str(root), loader="ffcv", ffcv_dir=str(tmp_path), image_size=32,
                     batch_size=3, eval_batch_size=4, num_workers=1, ffcv_max_resolution=40,
                     res_start=16, res_start_epoch=0, res_end_epoch=2)
    write_beton(cfg, "test", str(tmp_path / "imagenet_test.beton"))  # one file serves both loaders (saves time)
    seen = []
    for rank in range(2):
        ev = build_eval_loader(cfg, rank, 2, "cpu")
        for x, y in ev:
            assert x.shape[1:] == (3, 32, 32)
            want = torch.tensor(COLORS, dtype=torch.float32)[y] / 255
            assert (x - want[:, :, None, None]).abs().max() < 0.06
            seen += y.tolist()
    assert sorted(seen) == sorted([0, 1, 2] * 3)
    tr = build_train_loader(cfg, 0, 1, "cpu", seed=0, split="test")  # RandomResizedCrop + flip
    sizes = []
    for epoch in (0, 2):
        tr.set_epoch(epoch)
        x, y = next(iter(tr))
        sizes.append(x.shape[-1])
        want = torch.tensor(COLORS, dtype=torch.float32)[y] / 255  # crops of solid colours keep the colour
        assert (x - want[:, :, None, None]).abs().max() < 0.06
    assert sizes == [16, 32]  # progressive resolution: res_start at epoch 0, image_size at res_end_epoch


def test_progressive_resolution_schedule():
    got = [progressive_resolution(e, 160, 192, 10, 20) for e in range(0, 25)]
    assert got[:11] == [160] * 11 and got[20:] == [192] * 5
    assert all(a <= b for a, b in zip(got, got[1:])) and all(r % 32 == 0 for r in got)
    assert progressive_resolution(5, 0, 224, 0, 10) == 224  # off


def test_writer_cli_atomic_and_errors(tmp_path, capsys):
    out = tmp_path / "o" / "mnistlike.beton"
    env = dict(os.environ, PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "dsrna_dist.data.ffcv_write", "--data.name=synthetic", "--data.synthetic_size=9",
           "--data.synthetic_shape=1,6,6", "--split=train", f"--out={out}"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert out.is_file() and os.listdir(out.parent) == ["mnistlike.beton"]
    ld = FFCVLoader(str(out), 4, kind="raw", shuffle=False, seed=0, rank=0, world_size=1, drop_last=False,
                    cover_all=True, device="cpu", num_workers=1)
    x = torch.cat([b[0] for b in ld])
    cfg = DataConfig(name="synthetic", synthetic_size=9, synthetic_shape=(1, 6, 6))
    assert torch.equal((x * 255).round().to(torch.uint8), load_arrays(cfg, "train").images)
    before = out.read_bytes()
    # error paths in-process (same main() the module runs): one line, exit 2, nothing overwritten
    from dsrna_dist.data.ffcv_write import main

    for args, needle in ((["--data.name=nope"], "unknown dataset 'nope'"),
                         (["--data.name=mnist", f"--data.root={tmp_path / 'none'}"], "not found"),
                         (["--data.name=synthetic", "--data.batch_size=0"], "data.batch_size"),
                         (["--bogus=1"], "unexpected argument")):
        capsys.readouterr()
        assert main(args + ["--split=train", f"--out={out}"]) == 2
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert out.read_bytes() == before and os.listdir(out.parent) == ["mnistlike.beton"]


def test_missing_beton_names_writer_command(tmp_path):
    cfg = small_cfg(tmp_path / "empty")
    with pytest.raises(DataError, match="synthetic_train.beton.*ffcv_write --data.name=synthetic"):
        build_train_loader(cfg, 0, 1, "cpu", 0)
    junk = tmp_path / "junk.beton"
    junk.write_bytes(b"not a beton")
    with pytest.raises(DataError, match="junk.beton"):
        FFCVLoader(str(junk), 2, kind="raw", shuffle=False, seed=0, rank=0, world_size=1, drop_last=False,
                   cover_all=True, device="cpu", num_workers=1)


def test_missing_ffcv_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "ffcv", None)  # import ffcv -> ImportError
    with pytest.raises(DataError, match=r"dsrna_dist\[ffcv\]"):
        require_ffcv()


def test_dedupe_removes_distributed_sampler_padding():
    from torch.utils.data import DistributedSampler

    n, world = 7, 3
    idx, vals = [], []
    for rank in range(world):
        s = list(DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=False))
        idx += s
        vals += [10 * i for i in s]
    assert len(idx) == 9  # padded with duplicates
    uniq, v = dedupe_by_index(idx, vals)
    assert sorted(uniq) == list(range(n)) and v == [10 * i for i in uniq]

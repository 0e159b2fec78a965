"""Data layer: real on-disk formats (IDX, CIFAR pickles, JPEG folders), sharding, augmentation.

Readers are never mocked: every test writes tiny files in the real format and reads them back
through the public API; expected values come from an independent parse or from construction.
"""
import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from dsrna_dist.config import DataConfig, replace
from dsrna_dist.data import (Augment, DataError, MemoryLoader, build_augment, build_eval_loader,
                             build_train_loader, dataset_info, load_arrays, rank_indices, search_split)
from dsrna_dist.data.augment import crop_at, cutout_at, random_crop, random_flip
from dsrna_dist.data.cifar10 import load_batch

torch.set_num_threads(1)
FMNIST = "/usr/share/datasets/fashion-mnist"


# --------------------------------------------------------------------------- file writers (real formats)
def idx_bytes(arr: np.ndarray) -> bytes:
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    return struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape) + arr.tobytes()


def write_idx_set(d, n_train=20, n_test=10, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(d, exist_ok=True)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, n).astype(np.uint8)
        for kind, arr in (("images-idx3-ubyte", x), ("labels-idx1-ubyte", y)):
            data = idx_bytes(arr)
            name = f"{prefix}-{kind}" + (".gz" if gz else "")
            with open(os.path.join(d, name), "wb") as f:
                f.write(gzip.compress(data) if gz else data)
        out["train" if prefix == "train" else "test"] = (x, y)
    return out


def write_cifar(d, n_per_batch=6, protocol=2, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(d, exist_ok=True)
    xs, ys = {"train": [], "test": []}, {"train": [], "test": []}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n_per_batch)]
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                 b"filenames": [f"img{i}.png".encode() for i in range(n_per_batch)]}
        with open(os.path.join(d, name), "wb") as f:
            pickle.dump(batch, f, protocol=protocol)
        split = "test" if name == "test_batch" else "train"
        xs[split].append(data.reshape(-1, 3, 32, 32))
        ys[split] += labels
    return {s: (np.concatenate(xs[s]), np.array(ys[s])) for s in xs}


COLORS = [(250, 10, 10), (10, 250, 10), (10, 10, 250)]


def write_jpeg_tree(root, per_class=4, size=(40, 30)):
    from PIL import Image

    for split in ("train", "val"):
        for k, color in enumerate(COLORS):
            d = os.path.join(root, split, f"n0000000{k}")
            os.makedirs(d, exist_ok=True)
            for i in range(per_class):
                Image.new("RGB", size, color).save(os.path.join(d, f"img_{i}.JPEG"), quality=95)


# --------------------------------------------------------------------------- Fashion-MNIST (real files)
@pytest.mark.skipif(not os.path.isdir(FMNIST), reason="dataset-fashion-mnist apt package not installed")
def test_fashion_mnist_real_files_match_independent_parse():
    cfg = DataConfig(name="fashion_mnist")
    tr, te = load_arrays(cfg, "train"), load_arrays(cfg, "test")
    assert tr.images.shape == (60000, 1, 28, 28) and te.images.shape == (10000, 1, 28, 28)
    assert tr.images.dtype == torch.uint8 and tr.labels.dtype == torch.int64
    assert torch.bincount(tr.labels, minlength=10).tolist() == [6000] * 10
    assert torch.bincount(te.labels, minlength=10).tolist() == [1000] * 10
    # independent parse: labels start at byte 8, images at byte 16 (IDX header)
    with gzip.open(os.path.join(FMNIST, "train-labels-idx1-ubyte.gz")) as f:
        raw_labels = f.read()
    with gzip.open(os.path.join(FMNIST, "train-images-idx3-ubyte.gz")) as f:
        raw_images = f.read(16 + 2 * 784)
    assert raw_labels[8] == 9 and int(tr.labels[0]) == 9  # first training item is an ankle boot
    assert np.array_equal(np.frombuffer(raw_labels, np.uint8, offset=8), tr.labels.numpy())
    first_two = np.frombuffer(raw_images, np.uint8, offset=16).reshape(2, 28, 28)
    assert np.array_equal(first_two, tr.images[:2, 0].numpy())
    info = dataset_info("fashion_mnist")
    x = tr.images.float() / 255
    assert abs(x.mean().item() - info.mean[0]) < 1e-3 and abs(x.std().item() - info.std[0]) < 1e-3
    sub = load_arrays(replace(cfg, train_subset=100), "train")
    assert torch.equal(sub.labels, tr.labels[:100])


# --------------------------------------------------------------------------- IDX readers
@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip_root_and_torchvision_layout(tmp_path, gz):
    truth = write_idx_set(str(tmp_path / "MNIST" / "raw"), gz=gz)
    cfg = DataConfig(name="mnist", root=str(tmp_path))
    for split in ("train", "test"):
        ds = load_arrays(cfg, split)
        x, y = truth[split]
        assert np.array_equal(ds.images[:, 0].numpy(), x) and np.array_equal(ds.labels.numpy(), y)
    with pytest.raises(DataError, match="FashionMNIST/raw"):  # its torchvision folder is FashionMNIST
        load_arrays(DataConfig(name="fashion_mnist", root=str(tmp_path)), "train")
    flat = write_idx_set(str(tmp_path / "flat"), gz=gz, seed=1)
    ds = load_arrays(DataConfig(name="fashion_mnist", root=str(tmp_path / "flat")), "test")
    assert np.array_equal(ds.images[:, 0].numpy(), flat["test"][0])
    assert np.array_equal(ds.labels.numpy(), flat["test"][1])


def test_fashion_mnist_missing_root_names_file(tmp_path):
    with pytest.raises(DataError, match="train-images-idx3-ubyte.*not found"):
        load_arrays(DataConfig(name="fashion_mnist", root=str(tmp_path / "nowhere")), "train")


def _corrupt_cases():
    good_x = idx_bytes(np.zeros((3, 28, 28), np.uint8))
    return {
        "bad magic": (b"\x12\x34" + good_x[2:], "magic"),
        "wrong type byte": (good_x[:2] + b"\x0d" + good_x[3:], "data type"),
        "wrong ndim": (idx_bytes(np.zeros((3, 784), np.uint8)), "dimensions"),
        "wrong image size": (idx_bytes(np.zeros((3, 27, 28), np.uint8)), "dimension 1 is 27"),
        "truncated data": (good_x[:-100], "truncated"),
        "trailing bytes": (good_x + b"\x00" * 7, "trailing"),
        "truncated header": (good_x[:9], "header"),
        "truncated gzip": (gzip.compress(good_x)[:-30], "gzip"),
    }


@pytest.mark.parametrize("case", list(_corrupt_cases()))
def test_corrupt_idx_image_file_raises_data_error_naming_file(tmp_path, case):
    write_idx_set(str(tmp_path), n_train=3, n_test=3)
    data, needle = _corrupt_cases()[case]
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(data if case == "truncated gzip" else gzip.compress(data))
    with pytest.raises(DataError) as e:
        load_arrays(DataConfig(name="mnist", root=str(tmp_path)), "test")
    assert "t10k-images-idx3-ubyte.gz" in str(e.value) and needle in str(e.value)
    assert isinstance(e.value, ValueError)


def test_idx_label_problems(tmp_path):
    write_idx_set(str(tmp_path), n_train=3, n_test=3)
    lbl = tmp_path / "t10k-labels-idx1-ubyte.gz"
    lbl.write_bytes(gzip.compress(idx_bytes(np.array([1, 2], np.uint8))))
    with pytest.raises(DataError, match="3 images but .*2 labels"):
        load_arrays(DataConfig(name="mnist", root=str(tmp_path)), "test")
    lbl.write_bytes(gzip.compress(idx_bytes(np.array([1, 2, 10], np.uint8))))
    with pytest.raises(DataError, match="label 10"):
        load_arrays(DataConfig(name="mnist", root=str(tmp_path)), "test")


# --------------------------------------------------------------------------- CIFAR-10 pickles
@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL])
def test_cifar_batches_round_trip(tmp_path, protocol):
    truth = write_cifar(str(tmp_path / "cifar-10-batches-py"), protocol=protocol)
    cfg = DataConfig(name="cifar10", root=str(tmp_path))
    for split in ("train", "test"):
        ds = load_arrays(cfg, split)
        assert np.array_equal(ds.images.numpy(), truth[split][0])
        assert np.array_equal(ds.labels.numpy(), truth[split][1])
    assert len(load_arrays(cfg, "train")) == 30 and dataset_info("cifar10").in_channels == 3


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar_malicious_pickle_is_refused_and_not_executed(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    write_cifar(str(d))
    marker = tmp_path / "pwned"
    with open(d / "test_batch", "wb") as f:
        pickle.dump({b"data": _Evil(str(marker)), b"labels": []}, f, protocol=2)
    with pytest.raises(DataError, match=r"test_batch.*(posix|os|nt)\.system is not allowed"):
        load_arrays(DataConfig(name="cifar10", root=str(tmp_path)), "test")
    assert not marker.exists()
    with open(d / "test_batch", "wb") as f:  # builtins.eval is refused as well
        f.write(b"cbuiltins\neval\n(S'1+1'\ntR.")
    with pytest.raises(DataError, match="builtins.eval is not allowed"):
        load_batch(str(d / "test_batch"))


def test_cifar_truncated_and_malformed(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    write_cifar(str(d))
    p = d / "data_batch_3"
    p.write_bytes(p.read_bytes()[:500])
    with pytest.raises(DataError, match="data_batch_3"):
        load_arrays(DataConfig(name="cifar10", root=str(tmp_path)), "train")
    with open(p, "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f, protocol=2)
    with pytest.raises(DataError, match=r"data_batch_3.*\[N, 3072\]"):
        load_batch(str(p))
    with open(p, "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8)}, f, protocol=2)
    with pytest.raises(DataError, match="missing b'data' or b'labels'"):
        load_batch(str(p))
    with pytest.raises(DataError, match="no CIFAR-10 python batches"):
        load_arrays(DataConfig(name="cifar10", root=str(tmp_path / "empty")), "train")


# --------------------------------------------------------------------------- ImageNet folder (torchvision backend)
def test_imagenet_folder_torchvision_loaders(tmp_path):
    write_jpeg_tree(str(tmp_path))
    cfg = DataConfig(name="imagenet", root=str(tmp_path), loader="torchvision", image_size=16,
                     batch_size=4, eval_batch_size=5, num_workers=0)
    info = dataset_info(cfg)
    assert (info.num_classes, info.image_size, info.in_channels) == (3, 16, 3)
    tr = build_train_loader(cfg, 0, 1, "cpu", seed=0)
    x, y = next(iter(tr))
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    seen = []
    for rank in range(2):
        ev = build_eval_loader(cfg, rank, 2, "cpu")
        idx = ev.indices
        ys = []
        for x, y in ev:
            # solid-colour images: every pixel is the class colour (JPEG tolerance)
            want = torch.tensor(COLORS, dtype=torch.float32)[y] / 255
            assert (x - want[:, :, None, None]).abs().max() < 0.05
            ys.append(y)
        assert len(torch.cat(ys)) == len(idx)
        seen += list(idx)
    assert sorted(seen) == list(range(12))


def test_imagenet_random_crops_are_the_same_after_a_resume_and_for_any_worker_count(tmp_path):
    """RandomResizedCrop + flip run in DataLoader workers, which seed themselves from the global
    RNG once: keyed by (seed, epoch, sample) instead, epoch 1 of a fresh (resumed) loader with
    2 persistent workers equals epoch 1 of an uninterrupted 0-worker one, and the caller's RNG is
    not touched."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for k in range(3):  # textured images: a random crop of a solid colour is not a test
        d = tmp_path / "train" / f"n0000000{k}"
        d.mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(d / f"img_{i}.png")
    cfg = DataConfig(name="imagenet", root=str(tmp_path), loader="torchvision", image_size=16,
                     batch_size=4, num_workers=0)

    def epoch_batches(loader, epoch):
        loader.set_epoch(epoch)
        return [x for x, _ in loader]

    torch.manual_seed(123)
    state = torch.get_rng_state()
    straight = build_train_loader(cfg, 0, 1, "cpu", seed=5)
    e0 = epoch_batches(straight, 0)
    e1 = epoch_batches(straight, 1)
    assert torch.equal(torch.get_rng_state(), state)  # in-process transforms leave the caller's RNG alone
    resumed = build_train_loader(replace(cfg, num_workers=2), 0, 1, "cpu", seed=5)
    torch.manual_seed(999)  # a resumed run's global stream is wherever the checkpoint left it
    r1 = epoch_batches(resumed, 1)
    assert len(r1) == len(e1) == 3 and all(torch.equal(a, b) for a, b in zip(r1, e1))
    # the crops are random: epochs differ, and another seed differs
    assert not all(torch.equal(a, b) for a, b in zip(e0, e1))
    other = epoch_batches(build_train_loader(cfg, 0, 1, "cpu", seed=6), 1)
    assert not all(torch.equal(a, b) for a, b in zip(other, e1))


def test_imagenet_corrupt_jpeg_and_missing_tree(tmp_path):
    write_jpeg_tree(str(tmp_path), per_class=1)
    bad = tmp_path / "val" / "n00000001" / "img_0.JPEG"
    bad.write_bytes(bad.read_bytes()[:40])
    cfg = DataConfig(name="imagenet", root=str(tmp_path), loader="torchvision", image_size=16,
                     eval_batch_size=3, num_workers=0)
    with pytest.raises(DataError, match="img_0.JPEG"):
        for _ in build_eval_loader(cfg, 0, 1, "cpu"):
            pass
    with pytest.raises(DataError, match="train.*not found"):
        build_train_loader(replace(cfg, root=str(tmp_path / "nothing")), 0, 1, "cpu", 0)
    with pytest.raises(DataError, match="does not fit in memory"):
        build_train_loader(replace(cfg, loader="memory"), 0, 1, "cpu", 0)


# --------------------------------------------------------------------------- split and sharding
def test_search_split_disjoint_covering_seeded():
    a, b = search_split(101, 0.5, seed=3)
    assert len(a) == 50 and len(b) == 51 and not set(a) & set(b) and sorted(set(a) | set(b)) == list(range(101))
    a2, _ = search_split(101, 0.5, seed=3)
    a3, _ = search_split(101, 0.5, seed=4)
    assert np.array_equal(a, a2) and not np.array_equal(a, a3)
    assert len(search_split(1000, 0.8, 0)[0]) == 800
    with pytest.raises(DataError, match="train_portion"):
        search_split(1, 0.5, 0)


@pytest.mark.parametrize("n,world,bs", [(101, 3, 8), (64, 2, 16), (7, 4, 2)])
def test_memory_loader_train_shards(n, world, bs):
    images = torch.zeros(n, 1, 4, 4, dtype=torch.uint8)
    labels = torch.arange(n)  # labels reveal the example index
    per_rank = []
    for rank in range(world):
        ld = MemoryLoader(images, labels, bs, shuffle=True, seed=5, rank=rank, world_size=world, drop_last=True)
        ld.set_epoch(2)
        ys = torch.cat([y for _, y in ld]) if len(ld) else torch.empty(0, dtype=torch.long)
        assert len(ld) == (n // world) // bs and len(ys) == len(ld) * bs
        assert torch.equal(ys, torch.as_tensor(ld.indices))
        per_rank.append(set(ys.tolist()))
    assert sum(len(s) for s in per_rank) == len(set().union(*per_rank))  # disjoint
    # no drop_last: every rank still gets the same number of examples (N // world)
    ld = MemoryLoader(images, labels, bs, shuffle=True, seed=5, rank=0, world_size=world, drop_last=False)
    assert sum(len(y) for _, y in ld) == n // world
    # epochs reshuffle, same seed + epoch reproduces
    a = MemoryLoader(images, labels, bs, shuffle=True, seed=5, world_size=1, drop_last=False)
    b = MemoryLoader(images, labels, bs, shuffle=True, seed=5, world_size=1, drop_last=False)
    a.set_epoch(0), b.set_epoch(0)
    o0 = torch.cat([y for _, y in a])
    assert torch.equal(o0, torch.cat([y for _, y in b]))
    a.set_epoch(1)
    assert not torch.equal(o0, torch.cat([y for _, y in a])) and sorted(o0.tolist()) == list(range(n))


@pytest.mark.parametrize("n,world,bs", [(101, 3, 8), (5, 4, 2), (3, 4, 5)])
def test_eval_sharding_covers_each_example_exactly_once(n, world, bs):
    images = torch.zeros(n, 1, 2, 2, dtype=torch.uint8)
    labels = torch.arange(n)
    got = []
    for rank in range(world):
        ld = MemoryLoader(images, labels, bs, shuffle=False, rank=rank, world_size=world, drop_last=False,
                          cover_all=True)
        ys = [y for _, y in ld]
        assert len(ys) == len(ld)
        got += torch.cat(ys).tolist() if ys else []
    assert sorted(got) == list(range(n))


def test_build_loaders_memory_with_split_indices(tmp_path):
    cfg = DataConfig(name="synthetic", synthetic_size=40, synthetic_test_size=30, synthetic_shape=(1, 8, 8),
                     batch_size=4, eval_batch_size=7, crop_padding=2, flip=True, cutout=3)
    full = load_arrays(cfg, "train")
    tr_idx, va_idx = search_split(40, 0.5, 0)
    ld = build_train_loader(cfg, 1, 2, "cpu", seed=0, indices=va_idx)
    assert len(ld) == (20 // 2) // 4
    ys = torch.cat([y for _, y in ld])
    assert set(torch.as_tensor(ld.indices).tolist()) <= set(range(20))
    assert torch.equal(ys, full.labels[torch.as_tensor(va_idx)][torch.as_tensor(ld.indices)])
    ev = [build_eval_loader(cfg, r, 2, "cpu") for r in range(2)]
    test = load_arrays(cfg, "test")
    for e in ev:
        x = torch.cat([x for x, _ in e])
        assert torch.equal((x * 255).round().to(torch.uint8), test.images[torch.as_tensor(e.indices)])  # eval: no augmentation
    assert sorted(np.concatenate([e.indices for e in ev]).tolist()) == list(range(30))


# --------------------------------------------------------------------------- augmentations
def test_crop_at_matches_loop_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (6, 3, 9, 7), generator=g, dtype=torch.uint8)
    pad = 3
    padded = torch.nn.functional.pad(x, (pad,) * 4)
    dy = torch.randint(0, 2 * pad + 1, (6,), generator=g)
    dx = torch.randint(0, 2 * pad + 1, (6,), generator=g)
    out = crop_at(padded, dy, dx, 9, 7)
    for b in range(6):
        assert torch.equal(out[b], padded[b, :, dy[b]:dy[b] + 9, dx[b]:dx[b] + 7])


def test_crop_at_with_flip_matches_loop_reference():
    g = torch.Generator().manual_seed(5)
    padded = torch.randint(0, 256, (8, 2, 10, 12), generator=g, dtype=torch.uint8)
    dy, dx = torch.randint(0, 3, (8,), generator=g), torch.randint(0, 5, (8,), generator=g)
    flip = torch.rand(8, generator=g) < 0.5
    out = crop_at(padded, dy, dx, 8, 8, flip)
    for b in range(8):
        ref = padded[b, :, dy[b]:dy[b] + 8, dx[b]:dx[b] + 8]
        assert torch.equal(out[b], ref.flip(2) if flip[b] else ref)


def test_augment_crop_flip_outputs_are_padded_crops_or_their_mirrors():
    g = torch.Generator().manual_seed(6)
    x = torch.randint(1, 256, (64, 1, 6, 6), generator=g, dtype=torch.uint8)
    out = Augment(crop_padding=1, flip=True)(x, torch.Generator().manual_seed(7))
    padded = torch.nn.functional.pad(x, (1,) * 4)
    n_flipped = 0
    for b in range(64):
        crops = [padded[b, :, i:i + 6, j:j + 6] for i in range(3) for j in range(3)]
        plain = any(torch.equal(out[b], c) for c in crops)
        mirrored = any(torch.equal(out[b], c.flip(2)) for c in crops)
        assert plain or mirrored
        n_flipped += mirrored and not plain
    assert 15 < n_flipped < 49


def test_random_crop_is_a_padded_shift_and_offsets_vary():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(1, 256, (64, 1, 6, 6), generator=g, dtype=torch.uint8)
    pad = 2
    out = random_crop(x, pad, torch.Generator().manual_seed(2))
    padded = torch.nn.functional.pad(x, (pad,) * 4)
    offsets = set()
    for b in range(64):
        hits = [(i, j) for i in range(2 * pad + 1) for j in range(2 * pad + 1)
                if torch.equal(out[b], padded[b, :, i:i + 6, j:j + 6])]
        assert hits, f"example {b} is not a crop of its padded image"
        offsets.add(hits[0])
    assert len(offsets) > 10  # per-example offsets, not one for the whole batch


def test_flip_and_cutout_reference():
    g = torch.Generator().manual_seed(3)
    x = torch.randint(1, 256, (200, 2, 5, 5), generator=g, dtype=torch.uint8)
    out = random_flip(x, torch.Generator().manual_seed(4))
    flipped = [not torch.equal(out[b], x[b]) for b in range(200)]
    for b in range(200):
        assert torch.equal(out[b], x[b].flip(2) if flipped[b] else x[b])
    assert 60 < sum(flipped) < 140
    cy, cx = torch.tensor([0, 2, 4]), torch.tensor([4, 2, 0])
    cut = cutout_at(x[:3], cy, cx, 3)
    for b in range(3):
        ref = x[b].clone()
        ref[:, max(0, cy[b] - 1):cy[b] + 2, max(0, cx[b] - 1):cx[b] + 2] = 0
        assert torch.equal(cut[b], ref)


def test_augment_defaults_and_float_output():
    assert build_augment(DataConfig(name="mnist", crop_padding=0)) is None  # no flip on digits by default
    assert build_augment(DataConfig(name="mnist")).flip is False
    assert build_augment(DataConfig(name="cifar10")).flip is True
    assert build_augment(DataConfig(name="mnist", flip=True)).flip is True
    imgs = torch.full((10, 1, 4, 4), 255, dtype=torch.uint8)
    ld = MemoryLoader(imgs, torch.zeros(10, dtype=torch.long), 5, shuffle=True, seed=0, drop_last=True,
                      augment=Augment(crop_padding=1, flip=True, cutout=2))
    x, _ = next(iter(ld))
    assert x.dtype == torch.float32 and x.min() == 0.0 and x.max() == 1.0


# --------------------------------------------------------------------------- synthetic and registry
def test_synthetic_deterministic_configurable_and_learnable():
    cfg = DataConfig(name="synthetic", synthetic_size=600, synthetic_test_size=300,
                     synthetic_shape=(2, 12, 12), synthetic_classes=5)
    a, b = load_arrays(cfg, "train"), load_arrays(cfg, "train")
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.images.shape == (600, 2, 12, 12) and torch.bincount(a.labels).tolist() == [120] * 5
    info = dataset_info(cfg)
    assert (info.in_channels, info.image_size, info.num_classes) == (2, 12, 5)
    test = load_arrays(cfg, "test")
    assert not torch.equal(test.images[:10], a.images[:10])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(2 * 144, 5))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    ld = MemoryLoader(a.images, a.labels, 50, shuffle=True, seed=0, drop_last=True)
    for epoch in range(5):
        ld.set_epoch(epoch)
        for x, y in ld:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    acc = (model(test.images.float() / 255).argmax(1) == test.labels).float().mean().item()
    assert acc > 0.9


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(DataError, match="valid: .*cifar10.*fashion_mnist.*imagenet.*mnist.*synthetic"):
        dataset_info("cifar100")


def test_rank_validation():
    with pytest.raises(DataError, match="rank 2"):
        rank_indices(10, 2, 2)


def test_gpu_prepare_truncated_copy_equals_first_records_of_the_real_files(tmp_path):
    """bench/gpu_prepare.py's small copy (what travels to a device machine) is the real data's head."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "gpu_prepare", os.path.join(os.path.dirname(__file__), "..", "bench", "gpu_prepare.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        mod.truncate_idx(os.path.join(FMNIST, name), tmp_path / name, 300)
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        mod.truncate_idx(os.path.join(FMNIST, name), tmp_path / name, 50)
    full, small = DataConfig(name="fashion_mnist"), DataConfig(name="fashion_mnist", root=str(tmp_path))
    for split, n in (("train", 300), ("test", 50)):
        got = load_arrays(small, split)
        ref = load_arrays(replace(full, **{f"{split}_subset": n}), split)
        assert len(got) == n and torch.equal(got.images, ref.images) and torch.equal(got.labels, ref.labels)
    with pytest.raises(SystemExit, match="fewer than"):
        mod.truncate_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", tmp_path / "x.gz", 51)

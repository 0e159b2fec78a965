"""Fashion-MNIST (Xiao et al. 2017): 60k/10k 28x28 grayscale clothing images, 10 classes."""
from __future__ import annotations

from .base import DATASETS
from .mnist_like import MnistLike


@DATASETS.register("fashion_mnist")
class FashionMNIST(MnistLike):
    name = "fashion_mnist"
    folder = "FashionMNIST"
    system_dir = "/usr/share/datasets/fashion-mnist"
    install_hint = "install it with `apt-get install dataset-fashion-mnist`, "
    mean = (0.2860,)  # over the 60k training images
    std = (0.3530,)
    default_flip = False  # MNIST-like sets: no flip by default (data.flip=true enables it)

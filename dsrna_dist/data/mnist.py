"""MNIST handwritten digits: 60k/10k 28x28 grayscale, 10 classes. Flipping digits changes them."""
from __future__ import annotations

from .base import DATASETS
from .mnist_like import MnistLike


@DATASETS.register("mnist")
class MNIST(MnistLike):
    name = "mnist"
    folder = "MNIST"
    system_dir = ""
    mean = (0.1307,)
    std = (0.3081,)
    default_flip = False

"""Importing this module registers every dataset file (add a new dataset's module here)."""
from . import cifar10, fashion_mnist, imagenet, mnist, synthetic  # noqa: F401

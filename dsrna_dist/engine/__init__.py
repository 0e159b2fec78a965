"""Distributed runtime: accelerator setup, logging, checkpoints, sharded evaluation."""

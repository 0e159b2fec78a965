"""The DARTS search space: primitives, cells, supernet and derived networks."""

"""dsrna_dist: distributed Differentiable Search of Robust Neural Architectures."""
__version__ = "0.1.0"

"""protodepth: train Proto-Depth models on one GPU, many GPUs or many machines."""

__version__ = "0.1.0"

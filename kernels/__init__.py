"""Triton kernels of fastnas, installed as ``fastnas.kernels``."""

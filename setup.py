"""Build and install fastnas.

The Python package needs nothing compiled. The fused C++ kernels (``fastnas._C``) are built from ``csrc/`` when
torch is importable at build time (install with ``--no-build-isolation``).
"""
from setuptools import find_packages, setup

packages = find_packages(include=["fastnas", "fastnas.*"]) + ["fastnas.kernels"]

setup(
    name="fastnas",
    version="0.1.0",
    description="Fused-kernel engine for differentiable neural architecture search with attention (AT-DARTS)",
    packages=packages,
    package_dir={"fastnas.kernels": "kernels"},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6",
        "torchvision",
        "numpy",
        "scikit-learn",
        "tqdm",
        "matplotlib",
        "safetensors",
    ],
    extras_require={"test": ["pytest", "pytest-benchmark", "ninja", "cmake>=3.26"], "triton": ["triton"]},
)

"""Build and install fastnas.

The Python package needs nothing compiled. The fused C++ kernels (``fastnas._C``) are built from ``csrc/`` when
torch is importable at build time (install with ``--no-build-isolation``): the CPU kernels always, the CUDA kernels
(for sm_80 and sm_90 unless ``TORCH_CUDA_ARCH_LIST`` says otherwise) whenever a CUDA toolkit is found.

Environment switches, all optional:
  FASTNAS_CUDA=0/1     never / always build the CUDA kernels (default: when a toolkit is found and torch has CUDA)
  FASTNAS_NO_EXT=1     build no extension at all (pure Python; the ``reference`` backend is used)
  MAX_JOBS=n           parallel compile jobs (ninja)
"""
import glob
import os
import runpy

from setuptools import find_packages, setup

packages = find_packages(include=["fastnas", "fastnas.*"]) + ["fastnas.kernels"]
ROOT = os.path.dirname(os.path.abspath(__file__))


# The CUDA toolkit is found by tools/cuda_root.py, which CMakeLists.txt runs too.
_cuda_root = runpy.run_path(os.path.join(ROOT, "tools", "cuda_root.py"))
_is_cuda_root = _cuda_root["is_cuda_root"]
_find_cuda_root = _cuda_root["find_cuda_root"]


def _extensions():
    """(ext_modules, cmdclass) for fastnas._C, or ([], {}) when torch is not importable at build time."""
    if os.environ.get("FASTNAS_NO_EXT", "0") == "1":
        return [], {}
    switch = os.environ.get("FASTNAS_CUDA", "").strip().lower()
    if switch not in ("", "auto", "0", "1", "false", "true", "no", "yes", "off", "on"):
        raise RuntimeError(f"FASTNAS_CUDA={switch!r}: use 0 or 1 (or leave it unset to build CUDA when found)")
    cuda_root = _find_cuda_root()
    if switch in ("1", "true", "yes", "on") and cuda_root is None:
        raise RuntimeError("FASTNAS_CUDA=1 but no CUDA toolkit (bin/nvcc with lib64/libcudart.so) was found; "
                           "set CUDA_HOME to its root")
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported, and without a GPU its arch detection fails:
    # settle both before importing it.
    if cuda_root is not None and not _is_cuda_root(os.environ.get("CUDA_HOME")):
        os.environ["CUDA_HOME"] = cuda_root
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return [], {}
    if switch in ("", "auto"):
        with_cuda = cuda_root is not None and torch.version.cuda is not None
    else:
        with_cuda = switch in ("1", "true", "yes", "on")
    if with_cuda and torch.version.cuda is None:
        raise RuntimeError("FASTNAS_CUDA=1 but this torch has no CUDA support")

    sources = ["csrc/fastnas.cpp", "csrc/python_module.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-g0", "-fopenmp", "-fvisibility=hidden", "-DNDEBUG", "-Wno-unknown-pragmas"]
    nvcc = ["-O3", "-DNDEBUG", "-std=c++20", "--expt-relaxed-constexpr"]
    macros = []
    ext_cls = cpp_extension.CppExtension
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        macros.append(("FASTNAS_WITH_CUDA", None))
        ext_cls = cpp_extension.CUDAExtension
    ext = ext_cls(
        name="fastnas._C",
        sources=sources,
        define_macros=macros,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc} if with_cuda else {"cxx": cxx},
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="fastnas",
    version="0.1.0",
    description="Fused-kernel engine for differentiable neural architecture search with attention (AT-DARTS)",
    packages=packages,
    package_dir={"fastnas.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6",
        "torchvision",
        "numpy",
        "scikit-learn",
        "tqdm",
        "matplotlib",
        "safetensors",
        "pyyaml",  # --config files (fastnas.options)
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "ninja", "cmake>=3.26", "onnx", "onnxruntime", "onnxscript",
                 "tensorboard"],
        "tensorboard": ["tensorboard"],  # event files in each run folder (fastnas.tracking)
        "triton": ["triton"],
        "export": ["onnx", "onnxruntime", "onnxscript"],  # python -m fastnas.export --format onnx
    },
)

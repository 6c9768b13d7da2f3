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
import shutil

from setuptools import find_packages, setup

packages = find_packages(include=["fastnas", "fastnas.*"]) + ["fastnas.kernels"]
ROOT = os.path.dirname(os.path.abspath(__file__))


def _is_cuda_root(path):
    """A toolkit root holds the real nvcc and the runtime library (not a wrapper's directory)."""
    if not path:
        return False
    libs = ("lib64/libcudart.so", "lib/libcudart.so", "targets/x86_64-linux/lib/libcudart.so",
            "targets/sbsa-linux/lib/libcudart.so")
    return os.path.isfile(os.path.join(path, "bin", "nvcc")) and any(
        os.path.exists(os.path.join(path, lib)) for lib in libs)


def _find_cuda_root():
    """The real CUDA toolkit root, or None. An `nvcc` on PATH may be a wrapper script elsewhere: follow links and
    check for libcudart next to it before trusting it."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        try:  # a wrapper script that execs the real nvcc: take the absolute path it names
            with open(nvcc, "rb") as f:
                head = f.read(4096)
            if head.startswith(b"#!"):
                for tok in head.decode("utf-8", "replace").split():
                    if tok.endswith("/bin/nvcc") and os.path.isabs(tok):
                        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(tok))))
        except OSError:
            pass
    candidates.append("/usr/local/cuda")
    candidates.extend(sorted(glob.glob("/usr/local/cuda-*"), reverse=True))
    for c in candidates:
        if c and _is_cuda_root(os.path.realpath(c)):
            return os.path.realpath(c)
    return None


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
    ],
    extras_require={"test": ["pytest", "pytest-benchmark", "ninja", "cmake>=3.26"], "triton": ["triton"]},
)

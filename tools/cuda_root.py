"""The real CUDA toolkit root, found one way for both builds: setup.py imports find_cuda_root, CMakeLists.txt runs
this file and reads the root it prints (nothing when there is no toolkit).

A toolkit root holds bin/nvcc and the runtime library. An `nvcc` on PATH may be a wrapper script elsewhere (whose
directory has no libcudart, where torch's build helpers would then fail to find the libraries): links are followed and
an absolute .../bin/nvcc that a wrapper script names is tried too.
"""
import glob
import os
import shutil

_CUDART = ("lib64/libcudart.so", "lib/libcudart.so", "targets/x86_64-linux/lib/libcudart.so",
           "targets/sbsa-linux/lib/libcudart.so")


def is_cuda_root(path):
    """Whether path holds the real nvcc and the runtime library."""
    if not path:
        return False
    return os.path.isfile(os.path.join(path, "bin", "nvcc")) and any(
        os.path.exists(os.path.join(path, lib)) for lib in _CUDART)


def find_cuda_root():
    """The toolkit root (CUDA_HOME, CUDA_PATH, the nvcc on PATH, /usr/local/cuda, /usr/local/cuda-*), or None."""
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
        if c and is_cuda_root(os.path.realpath(c)):
            return os.path.realpath(c)
    return None


if __name__ == "__main__":
    print(find_cuda_root() or "")

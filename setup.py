"""Build pcl_ext: C++ kernels always, CUDA kernels when torch has CUDA and a toolkit is found.

The kernels use only the LibTorch stable ABI, compiled for TORCH_MIN (TORCH_TARGET_VERSION): the
binary needs nothing newer than torch TORCH_MIN exports, so one build (against any newer torch's
headers) loads on every torch >= TORCH_MIN.

Environment overrides:
  PCL_EXT_CUDA=0   force a CPU-only build
  PCL_EXT_CUDA=1   require the CUDA kernels (fail if they cannot be built)
  PCL_EXT_DEBUG=1  -O0 -g
Without a GPU, CUDA_HOME defaults to /usr/local/cuda (when it has nvcc) and
TORCH_CUDA_ARCH_LIST to the PORTABLE_CUDA_ARCHS that this nvcc can build, the last with PTX.
"""
import glob
import os
import subprocess

from setuptools import setup

import torch
from torch.utils import cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))
VERSION = "0.1.0"
TORCH_MIN = "2.11"  # also in pyproject.toml's build requirement
# One build for V100 (7.0), T4 (7.5), A100 (8.0) and H100 (9.0, with PTX for newer GPUs) when
# no GPU is visible; CUDA 13's nvcc no longer builds 7.0. CMakeLists.txt reads this line too.
PORTABLE_CUDA_ARCHS = "7.0;7.5;8.0;9.0"
# The trainer's and evaluation's libraries (the ops themselves need only torch).
TRAIN_REQUIRES = ["torchvision", "scikit-learn", "faiss-cpu", "tqdm", "matplotlib"]


def want_cuda() -> bool:
    flag = os.environ.get("PCL_EXT_CUDA", "auto").lower()
    if flag in ("0", "false", "no", "off"):
        return False
    has_torch_cuda = torch.version.cuda is not None
    if not os.environ.get("CUDA_HOME") and os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
        cpp_extension.CUDA_HOME = "/usr/local/cuda"
    found = has_torch_cuda and cpp_extension.CUDA_HOME is not None
    if flag in ("1", "true", "yes", "on") and not found:
        raise RuntimeError(
            "PCL_EXT_CUDA=1 but CUDA kernels cannot be built: torch.version.cuda="
            f"{torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME}")
    if found and not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        nvcc = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
        codes = subprocess.run([nvcc, "--list-gpu-code"], capture_output=True, text=True,
                               check=True).stdout.split()
        archs = [a for a in PORTABLE_CUDA_ARCHS.split(";") if "sm_" + a.replace(".", "") in codes]
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(archs[:-1] + [archs[-1] + "+PTX"])
    return found


def target_version_flag() -> str:
    """TORCH_TARGET_VERSION for TORCH_MIN: the torch headers then expose only the stable API of
    that release (and the unstable headers #error), whichever newer torch compiles."""
    major, minor = (int(v) for v in TORCH_MIN.split("."))
    return f"-DTORCH_TARGET_VERSION={major << 56 | minor << 48:#018x}"


def write_build_info(with_cuda: bool) -> None:
    with open(os.path.join(HERE, "pcl_ext", "_build_info.py"), "w") as f:
        f.write("# Written by setup.py: the torch whose headers compiled this package, and the\n"
                "# oldest torch the binary runs on (the stable ABI version it targets).\n")
        f.write(f"TORCH_VERSION = {torch.__version__!r}\n")
        f.write(f"TORCH_MIN = {TORCH_MIN!r}\n")
        f.write(f"WITH_CUDA = {with_cuda!r}\n")
        f.write(f"VERSION = {VERSION!r}\n")


def extension():
    with_cuda = want_cuda()
    write_build_info(with_cuda)
    debug = os.environ.get("PCL_EXT_DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # no-trapping-math lets GCC if-convert (and so vectorize) the clamped exp of the CPU kernel.
    # Hidden visibility: the stable ABI's header-only types are hidden, and the library exports
    # only PyInit__C (the ops register from static initializers).
    common = [target_version_flag(), "-std=c++20"]
    cxx = opt + common + ["-fopenmp", "-fno-trapping-math", "-fno-math-errno",
                          "-fvisibility=hidden", "-DPCL_EXT_PYTHON_MODULE"]
    args = dict(extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"],
                py_limited_api=True)
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        args["extra_compile_args"]["nvcc"] = opt + common + [
            "--expt-relaxed-constexpr", "-lineinfo", "-Xcompiler=-fvisibility=hidden"]
        return cpp_extension.CUDAExtension("pcl_ext._C", sources, **args)
    return cpp_extension.CppExtension("pcl_ext._C", sources, **args)


setup(
    name="pcl_ext",
    version=VERSION,
    description="Fused kernels for Prototypical Contrastive Learning (PCL) in PyTorch",
    packages=["pcl_ext"],
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    install_requires=[f"torch>={TORCH_MIN}", "numpy"],
    extras_require={
        "train": TRAIN_REQUIRES,
        "test": TRAIN_REQUIRES + ["pytest"],
    },
    python_requires=">=3.10",
    entry_points={"console_scripts": ["pcl-train = pcl_ext.train:main",
                                      "pcl-evaluate = pcl_ext.evaluate:main"]},
    # abi3 from CPython 3.10 on: torch's cpp_extension compiles with Py_LIMITED_API = 3.10.
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)

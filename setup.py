"""Build of fastopt: the pure-Python packages, kernels/ as fastopt.kernels, and the C++/CUDA
extension fastopt._C from csrc/ when csrc/ holds sources.

Needs the installed torch at build time: ``pip install --no-build-isolation .``. CUDA sources
(csrc/*.cu) are compiled only where torch has CUDA and nvcc is found; no GPU is needed to build.
Without torch, or with an empty csrc/, the install is pure Python and fastopt falls back to
its other backends (fastopt.backends reports why).
"""
import glob
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def extension_build():
    """(ext_modules, cmdclass) for fastopt._C, or ([], {}) when there is nothing to build."""
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not cpp:
        return [], {}
    try:
        import torch  # noqa: F401
        from torch.utils import cpp_extension
    except ImportError:
        print("fastopt: torch is not importable at build time; skipping the extension fastopt._C "
              "(install torch first and use pip install --no-build-isolation)")
        return [], {}
    cu = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    with_cuda = bool(cu) and cpp_extension.CUDA_HOME is not None and torch.version.cuda is not None
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp"]
    common = dict(name="fastopt._C", include_dirs=[os.path.join(HERE, "csrc")],
                  extra_link_args=["-fopenmp"])
    if with_cuda:
        ext = cpp_extension.CUDAExtension(sources=cpp + cu, define_macros=[("FASTOPT_WITH_CUDA", None)],
                                          extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17"]},
                                          **common)
    else:
        ext = cpp_extension.CppExtension(sources=cpp, extra_compile_args={"cxx": cxx_flags}, **common)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = extension_build()

setup(
    packages=find_packages(include=["fastopt", "fastopt.*"]) + ["fastopt.kernels"],
    package_dir={"fastopt.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)

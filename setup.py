"""Build of fastopt: the pure-Python packages, kernels/ as fastopt.kernels, and the C++/CUDA
extension fastopt._C from csrc/ when csrc/ holds sources.

Needs the installed torch at build time: ``pip install --no-build-isolation .``. CUDA sources
(csrc/*.cu) are compiled only where torch has CUDA and nvcc is found; no GPU is needed to build.
The sources and flags are those of fastopt/_extension_build.py, which the run-time build reads too;
OpenMP is used where the C++ compiler takes it (probed once, a note printed when it does not).
Without torch, or with an empty csrc/, the install is pure Python and fastopt falls back to
its other backends (fastopt.backends reports why).
"""

import importlib.util
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _build_config():
    """fastopt/_extension_build.py (flags and sources, shared with the run-time build), loaded
    without importing the fastopt package."""
    spec = importlib.util.spec_from_file_location(
        "_fastopt_extension_build", os.path.join(HERE, "fastopt", "_extension_build.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def extension_build():
    """(ext_modules, cmdclass) for fastopt._C, or ([], {}) when there is nothing to build."""
    config = _build_config()
    cpp, cu = config.sources("csrc")  # relative: setuptools wants source paths relative to setup.py
    if not cpp:
        return [], {}
    for name in config.unlisted("csrc"):
        print(f"fastopt: csrc/{name} is not listed in fastopt/_extension_build.py; not built")
    try:
        import torch  # noqa: F401
        from torch.utils import cpp_extension
    except ImportError:
        print(
            "fastopt: torch is not importable at build time; skipping the extension fastopt._C "
            "(install torch first and use pip install --no-build-isolation)"
        )
        return [], {}
    flags = config.config()
    if flags.note:
        print(f"fastopt: {flags.note}")
    with_cuda, why = config.cuda_buildable(cu)
    if cu and not with_cuda:
        print(f"fastopt: building fastopt._C without its CUDA kernels: {why}")
    # depends: a changed header rebuilds; headers and the CUDA sources go into the sdist even where
    # this build leaves the CUDA sources out.
    common = dict(
        name="fastopt._C",
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_link_args=flags.ld_flags,
        depends=config.headers("csrc") + cu,
    )
    if with_cuda:
        ext = cpp_extension.CUDAExtension(
            sources=cpp + cu,
            define_macros=[(config.CUDA_MACRO, None)],
            extra_compile_args={"cxx": flags.cxx_flags, "nvcc": config.NVCC_FLAGS},
            **common,
        )
    else:
        ext = cpp_extension.CppExtension(sources=cpp, extra_compile_args={"cxx": flags.cxx_flags}, **common)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = extension_build()

setup(
    packages=find_packages(include=["fastopt", "fastopt.*"]) + ["fastopt.kernels"],
    package_dir={"fastopt.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)

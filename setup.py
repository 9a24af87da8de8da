"""Build script.  The C++ CPU extension ``salstm_kernels._C`` is optional: see csrc/README.md.

* ``pip install -e . --no-build-isolation`` builds it (torch must already be importable);
* ``SALSTM_KERNELS_NO_CPP=1`` skips it;
* a failed build (no compiler, no torch at build time, a compile error) only warns: the package
  still installs and runs on the ``reference`` backend.
"""
import os
import sys
import warnings

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext as _setuptools_build_ext

SKIP_ENV = "SALSTM_KERNELS_NO_CPP"
HERE = os.path.dirname(os.path.abspath(__file__))
# The default-capability row kernels come before the AVX2 ones so that inline functions shared by
# both objects resolve to the portable copies.
SOURCES = ["csrc/python_module.cpp", "csrc/salstm_ops.cpp", "csrc/row_kernels_default.cpp", "csrc/row_kernels_avx2.cpp",
           "csrc/row_kernels_avx512.cpp"]


def _skip_reason():
    if os.environ.get(SKIP_ENV, "0") not in ("", "0"):
        return f"{SKIP_ENV} is set"
    try:
        import torch  # noqa: F401
        from torch.utils import cpp_extension  # noqa: F401
    except Exception as e:  # torch is needed at build time (use --no-build-isolation)
        return f"torch is not importable at build time ({e}); install with `pip install -e . --no-build-isolation`"
    return None


def _extension_and_cmdclass():
    reason = _skip_reason()
    if reason:
        warnings.warn(f"salstm_kernels: not building the C++ extension: {reason}")
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]  # as torch's own CPU build
    ext = CppExtension(
        name="salstm_kernels._C",
        sources=SOURCES,
        extra_compile_args=["-O3", "-Wno-psabi", *openmp],
        extra_link_args=openmp,
    )

    class OptionalBuildExt(BuildExtension):
        """BuildExtension that warns instead of failing: the extension is an optional speed-up."""

        _failed = False

        def run(self):
            try:
                super().run()
            except Exception as e:  # noqa: BLE001  (e.g. copying the missing .so after a failure)
                if not self._failed:
                    self._warn(e)

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:  # noqa: BLE001
                self._warn(e)

        def _warn(self, e):
            self._failed = True
            msg = (f"salstm_kernels: building the C++ extension failed ({type(e).__name__}: {e}); "
                   "the package is installed without it and uses the 'reference' backend on CPU")
            warnings.warn(msg)
            print(msg, file=sys.stderr)

    return [ext], {"build_ext": OptionalBuildExt.with_options(use_ninja=True)}


ext_modules, cmdclass = _extension_and_cmdclass()

setup(
    name="salstm_kernels",
    version="0.1.0",
    description="Fast, exact SA-LSTM and LSTM-SA modules: Triton (GPU) and C++ (CPU) fused kernels with a PyTorch reference",
    packages=find_packages(include=["salstm_kernels", "salstm_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.6"],
    entry_points={"console_scripts": ["salstm-kernels = salstm_kernels.cli:main"]},
    extras_require={
        "test": ["pytest>=8", "hypothesis>=6", "pytest-benchmark>=4", "numpy"],
        "triton": ["triton>=3.0"],
        "bench": ["matplotlib", "tqdm"],
        "examples": ["monai>=1.3", "matplotlib", "tqdm", "scipy"],
        "export": ["onnx", "onnxscript", "onnxruntime"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)

"""Build script.  The C++ CPU extension is optional: see csrc/README.md."""
from setuptools import find_packages, setup

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
    },
)

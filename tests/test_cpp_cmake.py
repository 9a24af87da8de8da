"""The CMake build of csrc/ (CMakeLists.txt): configure and build against libtorch in a temp dir,
then load the library with torch.ops.load_library in a subprocess (the setup.py-built ``_C``
registers the same op namespace, so the two must not meet in one process) and check the ops
against the reference provider.  About 40 s on 2 cores."""
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHECK = textwrap.dedent(
    """
    import sys, torch
    torch.ops.load_library(sys.argv[1])
    from salstm_kernels.ops import reference_kernels as rk
    from salstm_kernels.testing import assert_close, random_projections
    op = torch.ops.salstm_kernels_cpp
    g = torch.Generator().manual_seed(0)
    A = torch.randn(2, 32, 7, 9, generator=g, dtype=torch.float64)
    c = torch.randn(2, 8, 7, 9, generator=g, dtype=torch.float64)
    d = [torch.randn(2, 8, 7, 9, generator=g, dtype=torch.float64) for _ in range(3)]
    for a, b in zip(op.cell_forward(A, c), rk.cell_forward(A, c)):
        assert_close(a, b, torch.float64)
    for a, b in zip(op.cell_backward(A, c, d[0], d[1]), rk.cell_backward(A, c, d[0], d[1])):
        assert_close(a, b, torch.float64, backward=True)
    proj = tuple(p.detach() for p in random_projections(8, torch.float64, generator=g))
    got = op.attention_forward(A, c, *proj, 0.3, "linear")
    ref = rk.attention_forward(A, c, proj, 0.3, "linear")
    for a, b in zip(got, ref):
        assert_close(a, b, torch.float64)
    gb = op.attention_backward(A, c, *proj, ref[3], *d, 0.3, "linear")
    rb = rk.attention_backward(A, c, proj, ref[3], *d, 0.3, "linear")
    for a, b in zip(gb, list(rb[:2]) + list(rb[2])):
        assert_close(a, b, torch.float64, backward=True)
    print("OK")
    """
)


def _cmake():
    exe = shutil.which("cmake")
    if exe is None:
        pytest.skip("cmake is not installed")
    if shutil.which(os.environ.get("CXX", "c++")) is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler")
    return exe


def test_cmake_build_loads_and_matches_reference(tmp_path):
    cmake = _cmake()
    build = tmp_path / "build"
    prefix = torch.utils.cmake_prefix_path
    cfg = subprocess.run([cmake, "-S", ROOT, "-B", str(build), f"-DCMAKE_PREFIX_PATH={prefix}"],
                         capture_output=True, text=True, timeout=600)
    assert cfg.returncode == 0, cfg.stdout[-4000:] + cfg.stderr[-4000:]
    jobs = str(max(1, min(4, os.cpu_count() or 1)))
    bld = subprocess.run([cmake, "--build", str(build), "-j", jobs], capture_output=True, text=True, timeout=1200)
    assert bld.returncode == 0, bld.stdout[-4000:] + bld.stderr[-4000:]
    libs = [p for p in build.iterdir() if p.name.startswith("libsalstm_kernels_cpp")]
    assert libs, list(build.iterdir())
    env = dict(os.environ, SALSTM_KERNELS_NO_CPP="1")  # keep the setup.py-built _C out of this process
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", CHECK, str(libs[0])], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr

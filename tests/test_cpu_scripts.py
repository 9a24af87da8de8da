"""The CPU benchmark scripts still run (tiny shapes, one round)."""
import importlib.util
import os

import pytest
import torch

from salstm_kernels import cpp_extension, recurrence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(not cpp_extension.is_available(), reason="needs the C++ extension")
def test_cpu_conv_layout_rows(capsys, monkeypatch):
    """Every row measured at each shape, and the settings found put back afterwards (a rule unlike
    any row's, so that a script leaving its last row's setting behind fails)."""
    monkeypatch.setattr(recurrence, "CHANNELS_LAST_MIN_PIXELS", {"cpu": (7, 3)})
    kept = dict(recurrence.CHANNELS_LAST_MIN_PIXELS), set(recurrence.CAT_CONV_DEVICES)
    script = _load("cpu_conv_layout")
    assert script.main(["1,2,8,6", "2,1,8,5", "--rounds", "1", "--threads", str(torch.get_num_threads())]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("1,2,8,6x6", "2,1,8,5x5"))]
    assert len(rows) == 2, out
    for row in rows:
        assert row.count("x ") >= 5 and "eager " in row and "shipped " in row and "nchw+cat " in row, row
    assert (recurrence.CHANNELS_LAST_MIN_PIXELS, recurrence.CAT_CONV_DEVICES) == kept

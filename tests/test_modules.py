"""The new-code modules: API shapes, options and their link to the reference math."""
import math
import os

import pytest
import torch

import salstm_kernels as sk
from salstm_kernels import reference
from salstm_kernels.testing import assert_close


def test_exports():
    for name in ("SALSTM2d", "LSTMSA2d", "LSTMThenSA2d", "ConvLSTM2d", "available_backends", "use_backend"):
        assert hasattr(sk, name)


@pytest.mark.parametrize("cls", [sk.SALSTM2d, sk.LSTMSA2d, sk.LSTMThenSA2d, sk.ConvLSTM2d])
def test_shapes_and_state(cls):
    m = cls(3, [4, 5], 3)
    x = torch.randn(2, 3, 3, 7, 9)
    out, states = m(x, return_state=True)
    assert out.shape == (2, 5, 7, 9)
    assert [tuple(h.shape) for h, _ in states] == [(2, 4, 7, 9), (2, 5, 7, 9)]
    assert [tuple(c.shape) for _, c in states] == [(2, 4, 7, 9), (2, 5, 7, 9)]
    # 4-D input is one time step
    x1 = torch.randn(2, 3, 7, 9)
    torch.testing.assert_close(m(x1), m(x1.unsqueeze(1)))


def test_state_continues_a_sequence():
    """Running T=3 at once equals T=2 then T=1 from the returned state."""
    torch.manual_seed(0)
    m = sk.SALSTM2d(3, [4, 4], 3)
    x = torch.randn(1, 3, 3, 6, 5)
    full = m(x)
    _, st = m(x[:, :2], return_state=True)
    torch.testing.assert_close(m(x[:, 2:], state=st), full)


def test_attention_size_default_is_runtime_n():
    torch.manual_seed(1)
    m = sk.SALSTM2d(3, 4, 3)
    x = torch.randn(1, 2, 3, 6, 5)
    assert m.scale_for(x) == 1 / math.sqrt(30)
    m2 = sk.SALSTM2d(3, 4, 3, attention_size=30)
    m2.load_state_dict(m.state_dict())
    torch.testing.assert_close(m(x), m2(x))


def test_salstm_module_is_the_reference_function():
    torch.manual_seed(2)
    m = sk.SALSTM2d(3, [4, 6], 3, combination="nonlinear", attention_size=10)
    x = torch.randn(2, 2, 3, 5, 5)
    convs = m.convs()
    expected, _ = reference.salstm_ref(x, [c.weight for c in convs], [c.bias for c in convs], 1 / math.sqrt(10), "nonlinear")
    torch.testing.assert_close(m(x), expected)


def test_lstmsa_projections_sized_by_hidden_not_input():
    m = sk.LSTMSA2d(3, [7], 3)
    assert m.attention.q_matrix.weight.shape == (7, 7)
    assert m(torch.randn(1, 2, 3, 4, 4)).shape == (1, 7, 4, 4)


def test_slice_fusion_layer():
    layer = sk.SliceFusion2d(sk.LSTMSA2d, 4, [6], num_classes=3, kernel_size=3)
    xs = [torch.randn(2, 4, 5, 7) for _ in range(3)]
    assert layer(*xs).shape == (2, 3, 5, 7)


@pytest.mark.parametrize("bad", [dict(combination="cubic"), dict(kernel_size=4), dict(attention_size=0), dict(hidden_channels=[])])
def test_bad_constructor_arguments(bad):
    kw = dict(in_channels=3, hidden_channels=4, kernel_size=3)
    kw.update(bad)
    with pytest.raises(ValueError, match=next(iter(bad))):
        sk.SALSTM2d(**kw)


def test_wrong_input_channels_message_names_argument():
    with pytest.raises(ValueError, match="in_channels=3"):
        sk.SALSTM2d(3, 4, 3)(torch.randn(1, 2, 5, 6, 6))


def test_backward_reaches_every_parameter():
    m = sk.LSTMSA2d(3, [4, 4], 3)
    m(torch.randn(1, 2, 3, 5, 5)).square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_whole_module_pickles_of_an_older_version_still_run():
    """``torch.save(model)`` pickles the modules' instance attributes; one saved by an older
    version lacks any attribute added since, and its forward must not need it (``tests/data``:
    every module class and two compat classes, pickled at c1d3881).  Each runs, on every CPU
    backend, and gives what a module made now with the same state_dict gives."""
    from salstm_kernels import compat

    path = os.path.join(os.path.dirname(__file__), "data", "modules_c1d3881.pt")
    old = torch.load(path, weights_only=False)
    fresh = {
        "SALSTM2d": sk.SALSTM2d(3, [4, 5], 3, combination="nonlinear"),
        "LSTMSA2d": sk.LSTMSA2d(3, [4], 3),
        "LSTMThenSA2d": sk.LSTMThenSA2d(3, [4], 3),
        "ConvLSTM2d": sk.ConvLSTM2d(3, [4], 3),
        "SAOnly2d": sk.SAOnly2d(4),
        "SliceFusion2d": sk.SliceFusion2d(sk.LSTMSA2d, 3, [4], 2, kernel_size=3),
        "GatedTransLSTM": compat.GatedTransLSTM(4, [4], 3, True, 30),
        "TransLSTMLayer": compat.TransLSTMLayer(4, [4], 3, True, 2, 30),
    }
    assert set(old) == set(fresh)
    g = torch.Generator().manual_seed(0)
    inputs = {
        "SAOnly2d": (torch.randn(2, 4, 5, 6, generator=g),),
        "SliceFusion2d": tuple(torch.randn(2, 3, 5, 6, generator=g) for _ in range(3)),
        "GatedTransLSTM": (torch.randn(2, 2, 4, 5, 6, generator=g),),
        "TransLSTMLayer": tuple(torch.randn(2, 4, 5, 6, generator=g) for _ in range(3)),
    }
    for name, m_old in old.items():
        m_new = fresh[name]
        m_new.load_state_dict(m_old.state_dict())
        x = inputs.get(name, (torch.randn(2, 2, 3, 5, 6, generator=g),))
        for backend in sk.available_backends("cpu"):
            with sk.use_backend(backend), torch.no_grad():
                out = m_old(*x)
                assert_close(out, m_new(*x), torch.float32, name=f"{name} {backend}")

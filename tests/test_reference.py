"""The reference itself: gradcheck in float64, and the math written out once more by hand."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

from salstm_kernels import reference as ref
from salstm_kernels.testing import random_projections

D = torch.float64


def _conv_params(cin, hidden, k, gen):
    ws, bs = [], []
    for c_in, c in zip([cin] + hidden[:-1], hidden):
        ws.append((torch.randn(4 * c, c_in + c, k, k, generator=gen, dtype=D) * 0.3).requires_grad_())
        bs.append((torch.randn(4 * c, generator=gen, dtype=D) * 0.1).requires_grad_())
    return ws, bs


def test_gradcheck_cell():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(2, 12, 3, 4, generator=g, dtype=D, requires_grad=True)
    c = torch.randn(2, 3, 3, 4, generator=g, dtype=D, requires_grad=True)
    assert gradcheck(ref.lstm_cell_ref, (A, c))


@pytest.mark.parametrize("combination", ["linear", "nonlinear"])
@pytest.mark.parametrize("gated", [False, True])
def test_gradcheck_lstm_attention(combination, gated):
    g = torch.Generator().manual_seed(1)
    A = torch.randn(2, 12, 3, 5, generator=g, dtype=D, requires_grad=True)
    c = torch.randn(2, 3, 3, 5, generator=g, dtype=D, requires_grad=True)
    proj = random_projections(3, D, generator=g) if gated else ()

    def fn(A, c, *p):
        return ref.lstm_attention_ref(A, c, 0.4, combination, p if gated else None)

    assert gradcheck(fn, (A, c, *proj))


def test_gradcheck_channel_attention():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 3, 4, 5, generator=g, dtype=D, requires_grad=True) for _ in range(3))
    assert gradcheck(lambda q, k, v: ref.channel_attention(q, k, v, 0.5), (q, k, v))


@pytest.mark.parametrize("module", ["salstm", "lstmsa", "lstm_then_sa"])
def test_gradcheck_modules_functional(module):
    g = torch.Generator().manual_seed(3)
    hidden = [3, 4]
    ws, bs = _conv_params(2, hidden, 3, g)
    x = torch.randn(1, 2, 2, 3, 4, generator=g, dtype=D, requires_grad=True)
    h0 = torch.randn(1, 3, 3, 4, generator=g, dtype=D, requires_grad=True)
    c0 = torch.randn(1, 3, 3, 4, generator=g, dtype=D, requires_grad=True)
    proj = random_projections(4, D, generator=g)
    zeros = [torch.zeros(1, 4, 3, 4, dtype=D)] * 2

    def fn(x, h0, c0, w0, w1, b0, b1, *p):
        state = [(h0, c0), tuple(zeros)]
        if module == "salstm":
            return ref.salstm_ref(x, [w0, w1], [b0, b1], 0.3, "linear", state)[0]
        if module == "lstmsa":
            return ref.lstmsa_ref(x, [w0, w1], [b0, b1], p, 0.3, "nonlinear", state)[0]
        return ref.lstm_then_sa_ref(x, [w0, w1], [b0, b1], p, 0.3, state)[0]

    assert gradcheck(fn, (x, h0, c0, *ws, *bs, *proj))


def test_cell_matches_hand_written_equations():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 5, 6, generator=g)
    h = torch.randn(2, 4, 5, 6, generator=g)
    c = torch.randn(2, 4, 5, 6, generator=g)
    w = torch.randn(16, 7, 3, 3, generator=g) * 0.2
    b = torch.randn(16, generator=g)
    h1, c1, (i, f, o, gg) = ref.convlstm_cell(x, h, c, w, b)
    A = F.conv2d(torch.cat([x, h], 1), w, b, padding=1)
    # gate order i, f, o, g: channel blocks of 4 in that order
    sig = torch.sigmoid
    exp_c = sig(A[:, 4:8]) * c + sig(A[:, 0:4]) * torch.tanh(A[:, 12:16])
    torch.testing.assert_close(c1, exp_c)
    torch.testing.assert_close(h1, sig(A[:, 8:12]) * torch.tanh(exp_c))


def test_channel_attention_is_over_channels_with_explicit_scale():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 3, 4, 5, generator=g, dtype=D) for _ in range(3))
    out = ref.channel_attention(q, k, v, 0.25)
    for b in range(2):
        Q, K, V = q[b].reshape(3, 20), k[b].reshape(3, 20), v[b].reshape(3, 20)
        for r in range(3):
            s = [float(Q[r] @ K[j]) * 0.25 for j in range(3)]
            m = max(s)
            p = [math.exp(t - m) for t in s]
            p = [t / sum(p) for t in p]
            expected = sum(p[j] * V[j] for j in range(3))
            torch.testing.assert_close(out[b, r].reshape(20), expected)


def test_qkv_factors_paper_eq4():
    f, g, c, h = (torch.randn(2, 3) for _ in range(4))
    q, k, v = ref.qkv_factors(f, g, c, h, "linear")
    torch.testing.assert_close(q, (f + c) / 2)
    torch.testing.assert_close(k, (g + h) / 2)
    assert v is h
    q, k, v = ref.qkv_factors(f, g, c, h, "nonlinear")
    torch.testing.assert_close(q, torch.relu(f * c))
    torch.testing.assert_close(k, torch.relu(g * h))
    with pytest.raises(ValueError, match="combination"):
        ref.qkv_factors(f, g, c, h, "cubic")


def test_lstmsa_gates_projections_per_pixel():
    g = torch.Generator().manual_seed(6)
    A = torch.randn(1, 8, 2, 3, generator=g, dtype=D)
    c = torch.randn(1, 2, 2, 3, generator=g, dtype=D)
    proj = [p.detach() for p in random_projections(2, D, generator=g)]
    out, h, c1 = ref.lstm_attention_ref(A, c, 0.7, "linear", proj)
    i, f, o, gg = ref.lstm_gates(A)
    wq, bq, wk, bk, wv, bv = proj
    lin = lambda w, b: torch.einsum("oc,bchw->bohw", w, h) + b.view(1, -1, 1, 1)  # noqa: E731
    Q, K, V = (f + c1) / 2 * lin(wq, bq), (gg + h) / 2 * lin(wk, bk), h * lin(wv, bv)
    torch.testing.assert_close(out, ref.channel_attention(Q, K, V, 0.7))


def test_separated_and_sa_only_baselines():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 4, 5, generator=g, dtype=D)
    proj = [p.detach() for p in random_projections(3, D, generator=g)]
    q, k, v = (ref.channel_projection(x, proj[2 * j], proj[2 * j + 1]) for j in range(3))
    torch.testing.assert_close(ref.sa_only_ref(x, proj, 0.5), ref.channel_attention(q, k, v, 0.5))
    with pytest.raises(ValueError, match="projections"):
        ref._attend(x, x, x, x, 0.5, "none", None)

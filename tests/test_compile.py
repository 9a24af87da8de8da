"""``torch.compile(fullgraph=True)`` traces the modules and the compat classes without graph breaks,
on the reference backend, every available fused backend and the fused path with the pure-PyTorch
provider, and matches eager forward and backward.  Kept tiny: compiling is slow on a few cores."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import salstm_kernels as sk
from salstm_kernels import backends, compat
from salstm_kernels.testing import assert_close, grads_of
from salstm_kernels.validation import check_input

FUSED_REFERENCE = "fused:reference"
PATHS = sk.available_backends("cpu") + [FUSED_REFERENCE]


class Bundle(nn.Module):
    """SALSTM2d, LSTMSA2d and the two compat nets in one graph (one compile per path)."""

    def __init__(self, path: str, which=(0, 1, 2, 3)):
        super().__init__()
        torch.manual_seed(0)
        self.path = path
        self.nets = nn.ModuleList([
            sk.SALSTM2d(3, [3, 3], 3, combination="nonlinear"),
            sk.LSTMSA2d(3, [3], 3),
            compat.TransLSTM(3, [3], 3, True, 20),
            compat.GatedTransLSTM(3, [3], 3, True, 20),
        ])
        self.nets = nn.ModuleList([self.nets[i] for i in which])
        if not path.startswith("fused:"):
            for net in self.nets:
                net.backend = path

    def forward(self, x):
        if self.path.startswith("fused:"):
            x5 = check_input(x, 3, "Bundle")
            outs = [net._forward_fused(x5, None, self.path.split(":", 1)[1])[0] for net in self.nets]
        else:
            outs = [net(x) for net in self.nets]
        return torch.stack(outs)


@pytest.mark.parametrize("path", PATHS)
def test_fullgraph_compile_matches_eager(path):
    """Dynamo + AOTAutograd (fake kernels, registered autograd) for every path, forward and backward."""
    _compile_and_compare(path, "aot_eager", backward=True)


def test_inductor_forward():
    """Inductor codegen once (forward only; it is the slow part on CPU), through the fused ops."""
    _compile_and_compare(FUSED_REFERENCE if len(PATHS) == 2 else PATHS[1], "inductor", backward=False, which=(3,))


def _compile_and_compare(path, compile_backend, backward, which=(0, 1, 2, 3)):
    torch._dynamo.reset()
    m = Bundle(path, which)
    x = torch.randn(2, 2, 3, 4, 5, requires_grad=True)
    params = [x] + list(m.parameters())
    eager = m(x)
    gout = torch.randn_like(eager)
    eager_grads = grads_of([eager], params, [gout])
    compiled = torch.compile(m, fullgraph=True, dynamic=False, backend=compile_backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # 'auto' fallback notes
        out = compiled(x)
    assert_close(out, eager, torch.float32, name=f"{path} compiled forward")
    if not backward:
        return
    for i, (a, b) in enumerate(zip(grads_of([out], params, [gout]), eager_grads)):
        assert_close(a, b, torch.float32, backward=True, name=f"{path} compiled grad {i}")


def test_backend_choice_is_traced_without_graph_break_and_follows_use_backend():
    """``resolve_backend`` is a trace-time constant; a new ``use_backend`` context recompiles."""
    torch._dynamo.reset()
    calls = []

    def f(x):
        name = backends.resolve_backend("auto", x.device)
        calls.append(name)  # runs at trace time only
        return x + len(name)

    cf = torch.compile(f, fullgraph=True)
    x = torch.zeros(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        auto = backends.resolve_backend("auto", x.device)
        assert torch.equal(cf(x), x + len(auto))
        with sk.use_backend("reference"):
            assert torch.equal(cf(x), x + len("reference"))
    assert calls[-1] == "reference"


def test_fullgraph_compile_with_hooked_and_reparametrized_submodules():
    """A forward hook on a conv (the modules warn in eager mode that it does not run) and a
    ``weight_norm`` pre-hook (which they run) leave no graph break: the warning stayed in the trace
    and ``fullgraph=True`` raised."""
    torch.manual_seed(1)
    m = sk.LSTMSA2d(3, [4], 3, backend=sk.available_backends("cpu")[-1])
    m.cell0.conv.register_forward_hook(lambda *a: None)
    torch.nn.utils.weight_norm(m.attention.q_matrix)
    x = torch.randn(1, 2, 3, 4, 4)
    with pytest.warns(UserWarning, match="do not run"):
        want = m(x)
    with warnings.catch_warnings():
        # no warning of ours from inside the compiled graph either (UserWarning: other categories
        # come from the Triton interpreter, e.g. NumPy deprecations under triton 3.6)
        warnings.simplefilter("error", UserWarning)
        got = torch.compile(m, backend="aot_eager", fullgraph=True)(x)
    assert_close(got, want, torch.float32)


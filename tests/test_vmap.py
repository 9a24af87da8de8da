"""``torch.func.vmap`` over the modules and the fused ops (``salstm_kernels/ops/batching.py``).

The vmapped dimension over per-image arguments folds into the batch (one op call); vmapped weights
(an ensemble) run one call per index.  Every backend matches a loop of the reference over the
vmapped dimension, forward and every gradient (autograd outside the transform)."""
import copy
import sys

import pytest
import torch

import salstm_kernels as sk
from salstm_kernels.backends import available_backends
from salstm_kernels.testing import assert_close, grads_of

BACKENDS = available_backends("cpu")
MODULES = (sk.SALSTM2d, sk.LSTMSA2d, sk.LSTMThenSA2d, sk.ConvLSTM2d)


def _pair(cls, backend, seed=0):
    """A module on ``backend`` and the same weights on the reference: 2 layers, C = 5 then 6."""
    torch.manual_seed(seed)
    m = cls(3, [5, 6], 3, backend=backend)
    ref = copy.deepcopy(m)
    ref.backend = "reference"
    return m, ref


def _check(outs, want, params, want_params, inputs, what):
    """Outputs and the gradients of ``inputs + params`` under one random upstream gradient."""
    g = [torch.randn_like(o) for o in outs]
    for o, w in zip(outs, want):
        assert_close(o, w, torch.float32, name=f"{what} forward")
    got = grads_of(outs, inputs + params, g)
    exp = grads_of(want, inputs + want_params, g)
    for i, (a, b) in enumerate(zip(got, exp)):
        assert_close(a, b, torch.float32, backward=True, name=f"{what} gradient {i}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", MODULES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("T", [1, 2])
def test_vmap_over_a_module_matches_a_loop(backend, cls, T):
    """``vmap(m)`` over ``x (V, B, T, Cin, H, W)``: on cpp it used to raise ("NYI: querying
    is_contiguous inside of vmap", from the channels_last convs), elsewhere PyTorch's own per-index
    loop ran with a warning.  Returned states too."""
    m, ref = _pair(cls, backend)
    x = torch.randn(3, 2, T, 3, 5, 4, requires_grad=True)

    def run(module, x):
        out, states = module(x, return_state=True)
        return [out] + [t for s in states for t in s]

    outs = torch.func.vmap(lambda x: run(m, x))(x)
    want = [torch.stack(o) for o in zip(*(run(ref, xi) for xi in x))]
    _check(outs, want, list(m.parameters()), list(ref.parameters()), [x], f"{backend} {cls.__name__} T={T}")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_vmapped_images_fold_into_one_op_call(backend, monkeypatch):
    """The rule folds ``V`` into ``B``: the attention op runs once on ``V*B`` images, not ``V``
    times on ``B`` (PyTorch's fallback without a rule)."""
    op_module = sys.modules["salstm_kernels.ops.lstm_attention"]
    batches = []
    check = op_module.check_lstm_attention_args

    def spy(A, *args):
        batches.append(A.shape[0])
        return check(A, *args)

    monkeypatch.setattr(op_module, "check_lstm_attention_args", spy)
    m, _ = _pair(sk.LSTMSA2d, backend)
    with torch.no_grad():
        torch.func.vmap(m)(torch.randn(3, 2, 2, 3, 5, 4))
    assert batches == [6], batches


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", (sk.SALSTM2d, sk.LSTMSA2d), ids=lambda c: c.__name__)
def test_vmap_over_an_ensemble_matches_a_loop(backend, cls):
    """Weights vmapped (``stack_module_state`` + ``functional_call``): the ops run per model;
    outputs and the gradients of the stacked weights match each model's own."""
    models = [_pair(cls, backend, seed)[0] for seed in range(3)]
    refs = []
    for m in models:
        refs.append(copy.deepcopy(m))
        refs[-1].backend = "reference"
    params, buffers = torch.func.stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    x = torch.randn(2, 2, 3, 5, 4)
    out = torch.func.vmap(lambda p, b: torch.func.functional_call(base, (p, b), (x,)))(params, buffers)
    want = torch.stack([r(x) for r in refs])
    names = list(params)  # (the order of each model's parameters())
    g = torch.randn_like(out)
    assert_close(out, want, torch.float32, name=f"{backend} ensemble forward")
    got = grads_of([out], [params[n] for n in names], [g])
    exp = grads_of([want], [p for r in refs for p in r.parameters()], [g])
    exp = [torch.stack(exp[i::len(names)]) for i in range(len(names))]  # per model, stacked
    for n, a, b in zip(names, got, exp):
        assert_close(a, b, torch.float32, backward=True, name=f"{backend} ensemble gradient {n}")

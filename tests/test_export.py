"""Graphs that serve every batch and image size: ``torch.compile(dynamic=True)``, ``torch.export``
with symbolic ``B, H, W``, ``torch.jit.trace`` and ONNX export, each run at a size other than the
one traced and compared with the eager module.  ``attention_size=None`` scales the scores by
``1/sqrt(H*W)``; a Python float made from the traced size used to become a constant of the graph.
The ONNX tests need ``onnx``, ``onnxscript`` and ``onnxruntime`` (``pip install -e ".[export]"``;
CI installs them)."""
from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import salstm_kernels as sk
from salstm_kernels import recurrence
from salstm_kernels.testing import assert_close, grads_of

PATHS = sk.available_backends("cpu")
SHIPPED_LAYOUT_RULE = dict(recurrence.CHANNELS_LAST_MIN_PIXELS)  # (conftest's fixture switches it off)


@pytest.fixture(autouse=True)
def shipped_layout_rule(monkeypatch):
    """The shipped conv layout rule: on cpp, images of 1024 pixels and more run channels_last, the
    smaller ones NCHW.  A graph must serve both sides without a guard on the size."""
    monkeypatch.setattr(recurrence, "CHANNELS_LAST_MIN_PIXELS", SHIPPED_LAYOUT_RULE)


def _nets(path):
    torch.manual_seed(2)
    nets = [sk.SALSTM2d(3, [4], 3), sk.LSTMSA2d(3, [3], 3, combination="nonlinear")]  # attention_size=None
    for net in nets:
        net.backend = path
    return nets


def _compare(graph, net, x, what):
    """``graph(x)`` against ``net(x)``, forward and the gradients of ``x`` and every parameter (the
    graph's own where it holds copies: a loaded program)."""
    own = list(graph.parameters()) if isinstance(graph, torch.nn.Module) else []
    params = [x] + list(net.parameters())
    graph_params = [x] + own if own else params
    assert len(graph_params) == len(params), what
    want = net(x)
    got = graph(x)
    gout = torch.randn_like(want)
    assert_close(got, want, torch.float32, name=what)
    for i, (a, b) in enumerate(zip(grads_of([got], graph_params, [gout]), grads_of([want], params, [gout]))):
        assert_close(a, b, torch.float32, backward=True, name=f"{what} grad {i}")


@pytest.mark.parametrize("path", PATHS)
def test_compile_dynamic_does_not_recompile_per_image_size(path):
    """One graph for three sizes.  A float computed from ``H*W`` and passed to the fused op (a
    constant in the graph) once guarded the graph to one ``H*W``: a recompile per size, and eager
    after 8 sizes."""
    for net in _nets(path):
        torch._dynamo.reset()
        counter = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(net, backend=counter, dynamic=True, fullgraph=True)
        # first call: B, H, W unlike each other, T = 2 and Cin = 3 (dynamo gives equal sizes one
        # symbol, and specializes 0 and 1)
        # the last one: B*H*W over the cpp layout rule's 1024 pixels, the others under it
        for B, H, W in ((4, 5, 6), (6, 3, 7), (5, 8, 4), (4, 20, 17)):
            _compare(compiled, net, torch.randn(B, 2, 3, H, W, requires_grad=True), f"{path} {H}x{W}")
        assert counter.frame_count == 1, f"{type(net).__name__} on {path}: {counter.frame_count} compiles for 4 sizes"


@pytest.mark.parametrize("path", PATHS)
def test_export_with_dynamic_batch_and_image_size(path):
    """``torch.export`` with symbolic ``B, H, W`` (the time loop unrolls, so ``T`` is fixed), then a
    ``torch.export.save`` / ``load`` round trip."""
    B, H, W = torch.export.Dim("B"), torch.export.Dim("H", min=2), torch.export.Dim("W", min=2)
    for net in _nets(path):
        ep = torch.export.export(net, (torch.randn(4, 2, 3, 5, 6),), dynamic_shapes=({0: B, 3: H, 4: W},))
        _compare(ep.module(), net, torch.randn(3, 2, 3, 6, 3, requires_grad=True), f"{path} exported")
        _compare(ep.module(), net, torch.randn(4, 2, 3, 20, 20, requires_grad=True), f"{path} exported, large")
        f = io.BytesIO()
        torch.export.save(ep, f)
        f.seek(0)
        _compare(torch.export.load(f).module(), net, torch.randn(5, 2, 3, 4, 7, requires_grad=True), f"{path} loaded")


@pytest.mark.parametrize("path", PATHS)
def test_jit_trace_follows_the_image_size(path):
    """``torch.jit.trace`` records sizes as 0-dim tensors; the reference path's ``1/sqrt(H*W)`` was
    a float of the example's size, silently wrong at any other (SA-LSTM 8e-3 off at 8x7)."""
    for net in _nets(path) + [sk.SAOnly2d(4)]:
        if isinstance(net, sk.SAOnly2d):
            x0, x = torch.randn(2, 4, 5, 6), torch.randn(3, 4, 8, 7)
        else:
            x0, x = torch.randn(2, 2, 3, 5, 6), torch.randn(3, 2, 3, 8, 7)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarning, and torch.jit's deprecation
            traced = torch.jit.trace(net, x0, check_trace=False)
        with torch.no_grad():
            assert_close(traced(x), net(x), torch.float32, name=f"{path} {type(net).__name__} traced")


def _onnx_runtime():
    pytest.importorskip("onnx")
    return pytest.importorskip("onnxruntime")


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("path", PATHS)
def test_onnx_export_runs_any_image_size(path, dynamo):
    """Both ONNX exporters, every backend (the modules export the reference math under
    ``torch.onnx.export``: ONNX has no translation of the fused ops), dynamic ``B, H, W``; the ONNX
    Runtime result at another size matches the eager module on its own backend."""
    ort = _onnx_runtime()
    if dynamo:
        pytest.importorskip("onnxscript")
    for net in _nets(path):
        net.eval()
        x0 = torch.randn(4, 2, 3, 5, 6)
        f = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporters' own notes (TracerWarning, deprecations)
            if dynamo:
                dims = {0: torch.export.Dim("B"), 3: torch.export.Dim("H", min=2), 4: torch.export.Dim("W", min=2)}
                torch.onnx.export(net, (x0,), f, dynamo=True, dynamic_shapes=(dims,), verbose=False)
            else:
                torch.onnx.export(net, (x0,), f, dynamo=False, input_names=["x"],
                                  dynamic_axes={"x": {0: "B", 3: "H", 4: "W"}})
        session = ort.InferenceSession(f.getvalue(), providers=["CPUExecutionProvider"])
        x = torch.randn(3, 2, 3, 8, 7)
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
        with torch.no_grad():
            assert_close(got, net(x).contiguous(), torch.float32, name=f"{path} {type(net).__name__} onnx")


def test_onnx_export_takes_the_reference_backend():
    """Under ``torch.onnx.export`` every module resolves to ``"reference"``, an explicit fused
    backend too (outside it, the module's own)."""
    net = _nets(PATHS[-1])[0]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
        assert sk.backends.resolve_backend(net.backend, torch.device("cpu")) == "reference"
    assert sk.backends.resolve_backend(net.backend, torch.device("cpu")) == PATHS[-1]


def test_torch_jit_script_names_the_alternatives():
    """TorchScript cannot compile the modules' forward; its own error named a type annotation
    (``Unknown type annotation: 'Optional[str]'``), and a second try "Can't redefine method"."""
    for net in (_nets("reference")[0], sk.SAOnly2d(4), sk.SliceFusion2d(sk.LSTMSA2d, 3, [3], 2, 3)):
        for _ in range(2):
            with pytest.raises(RuntimeError, match="cannot be compiled by torch.jit.script; use torch.jit.trace, torch.export"):
                torch.jit.script(net)

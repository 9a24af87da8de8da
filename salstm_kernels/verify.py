"""Parity of every available backend against the reference: ``salstm-kernels verify``.

For each module design, shape, dtype and backend: run the module on the backend, run the
``reference`` backend in float64 on the *same* (already rounded) parameters, input and initial
state, and compare the output, the final states, and every gradient -- input, initial state, all
parameters -- under one random upstream gradient.  Errors are :func:`salstm_kernels.testing.scaled_error`
against the one tolerance table in :mod:`salstm_kernels.testing`; a tensor over its tolerance still
passes when the reference backend, run in the same dtype, misses the float64 answer at least half as
much, up to a cap (:func:`same_dtype_allowance`: an ill-conditioned tensor, not this package's error).

Which backends: everything :func:`salstm_kernels.available_backends` lists for the device (so new
backends are picked up as they are registered), plus ``reference-ops``: the fused-op path
(split-conv recurrence + the ``torch.library`` ops) computed by the pure-PyTorch kernel provider,
which checks the op plumbing the fused backends share even when none of them is built.

Which dtypes: CPU float32 and float64 (bfloat16 only if the backend's kernel provider claims it),
CUDA float32, float16 and bfloat16.  A provider claims dtypes with an optional module function
``supported_dtypes(device_type: str) -> Sequence[torch.dtype]`` (see
:func:`salstm_kernels.ops.providers.supported_dtypes`).

:func:`parity` is also the correctness gate of ``salstm-kernels bench``.

The backend runs with cuDNN's TF32 convolutions off (:func:`exact_float32_convs`; it matters for
float32): PyTorch allows them by default, and cuDNN then picks TF32 or full-precision kernels per
shape and memory layout, so a float32 comparison would measure that choice (about 1e-4, above the
float32 tolerance) rather than this package's code.
"""
from __future__ import annotations

import contextlib
import copy
import math
import sys
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .backends import available_backends
from .modules import ConvLSTM2d, LSTMSA2d, LSTMThenSA2d, SALSTM2d
from .ops import providers
from .testing import scaled_error, tolerance
from .validation import check_input

#: The implementation label for the fused-op path run by the pure-PyTorch kernel provider.
REFERENCE_OPS = "reference-ops"

#: ``name -> factory(in_channels, hidden_channels, kernel_size, backend)``.
DESIGNS: Dict[str, Callable[..., nn.Module]] = {
    "SALSTM2d(linear)": lambda cin, hid, k, be: SALSTM2d(cin, hid, k, combination="linear", backend=be),
    "SALSTM2d(nonlinear)": lambda cin, hid, k, be: SALSTM2d(cin, hid, k, combination="nonlinear", backend=be),
    "LSTMSA2d(linear)": lambda cin, hid, k, be: LSTMSA2d(cin, hid, k, combination="linear", backend=be),
    "LSTMSA2d(nonlinear)": lambda cin, hid, k, be: LSTMSA2d(cin, hid, k, combination="nonlinear", backend=be),
    "LSTMThenSA2d": lambda cin, hid, k, be: LSTMThenSA2d(cin, hid, k, backend=be),
    "ConvLSTM2d": lambda cin, hid, k, be: ConvLSTM2d(cin, hid, k, backend=be),
}


@dataclass(frozen=True)
class Shape:
    B: int
    T: int
    Cin: int
    hidden: Tuple[int, ...]
    H: int
    W: int
    k: int
    #: pass a random initial state (else zero state: the fused path skips the t=0 recurrent conv)
    with_state: bool = True

    def __str__(self) -> str:
        hid = "x".join(map(str, self.hidden))
        st = "state" if self.with_state else "zero-state"
        return f"B{self.B} T{self.T} Cin{self.Cin} C{hid} {self.H}x{self.W} k{self.k} {st}"


#: Odd sizes on purpose: non-square, non-power-of-two pixels and channels, T=1 and 3, two layers.
SHAPES: Tuple[Shape, ...] = (
    Shape(2, 2, 8, (16,), 8, 8, 3),
    Shape(1, 1, 5, (24,), 7, 9, 5, with_state=False),
    Shape(2, 3, 4, (8,), 9, 7, 3),
    Shape(2, 2, 6, (8, 12), 6, 10, 3),
    Shape(1, 3, 3, (6, 10), 5, 7, 3, with_state=False),
)
QUICK_SHAPES: Tuple[Shape, ...] = (
    Shape(1, 1, 5, (24,), 7, 9, 5, with_state=False),
    Shape(2, 3, 3, (6, 10), 5, 7, 3),
)


# ------------------------------------------------------------------------------------------------
# one comparison
# ------------------------------------------------------------------------------------------------
@dataclass
class Parity:
    """Max scaled errors of one run against the float64 reference, and which tensor was worst."""

    dtype: str
    fwd_err: float = 0.0
    fwd_worst: str = ""
    bwd_err: float = 0.0
    bwd_worst: str = ""
    fwd_tol: float = 0.0
    bwd_tol: float = 0.0
    error: str = ""  # an exception raised by the backend, if any
    #: tensors over the dtype's tolerance that the reference itself, run in the same dtype, misses
    #: too: name -> that reference's error; their allowance is :func:`same_dtype_allowance` of it
    #: (twice it, capped), and ``fwd_tol`` / ``bwd_tol`` show the worst one's
    same_dtype_reference: Dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.error and self.fwd_err <= self.fwd_tol and self.bwd_err <= self.bwd_tol


#: A tensor over the dtype's tolerance passes if its error is at most this many times the error of
#: the reference backend run in the same dtype (against the same float64 answer).  Errors are
#: relative to each tensor's own largest value, so an ill-conditioned one -- a gradient that is a
#: small difference of large terms, a saturated softmax -- can miss a fixed tolerance in every
#: implementation, eager PyTorch included (a fuzzing run: float32 q-projection gradient 6.4e-3, eager
#: float32 the same 6.4e-3, tolerance 1e-4).  What the check is for still fails: a wrong or zeroed
#: tensor is far beyond twice the same-dtype reference's rounding, and the allowance is capped
#: (:data:`SAME_DTYPE_CAP`) so that it can never reach a zeroed tensor's error of 1.
SAME_DTYPE_MARGIN = 2.0
#: ... but never beyond this: a tensor the same-dtype reference misses by more than half this much
#: is not verifiable in that dtype, and an allowance that large would pass a zeroed tensor (error 1).
SAME_DTYPE_CAP = 0.25


def same_dtype_allowance(tol: float, same_dtype_err: float) -> float:
    """A tensor's tolerance given the same-dtype reference's own error: ``tol`` widened to
    :data:`SAME_DTYPE_MARGIN` x that error, at most :data:`SAME_DTYPE_CAP` (never below ``tol``);
    a non-finite error (the reference overflowed) widens nothing."""
    if not math.isfinite(same_dtype_err):
        return tol
    return max(tol, min(SAME_DTYPE_MARGIN * same_dtype_err, SAME_DTYPE_CAP))


Runner = Callable[[Tensor, Optional[List[Tuple[Tensor, Tensor]]]], Tuple[Tensor, List[Tuple[Tensor, Tensor]]]]


def module_runner(module: nn.Module, impl: Optional[str] = None) -> Runner:
    """``run(x, state) -> (out, states)`` for ``module`` (or a compiled wrapper of it).

    ``impl == REFERENCE_OPS`` forces the fused-op path with the pure-PyTorch kernel provider.
    """
    if impl == REFERENCE_OPS:
        # The modules route backend="reference" to the plain reference math; the op path with the
        # reference provider is reached through the fused-forward hook every fused backend uses.
        target = getattr(module, "_orig_mod", module)

        def run(x, state):
            x = check_input(x, target.in_channels, type(target).__name__)
            return target._forward_fused(x, state, "reference")

        return run
    return lambda x, state: module(x, state, return_state=True)


def _named_outputs(out: Tensor, states) -> Dict[str, Tensor]:
    named = {"out": out}
    for layer, (h, c) in enumerate(states):
        named[f"h[{layer}]"] = h
        named[f"c[{layer}]"] = c
    return named


def _forward_backward(run: Runner, module: nn.Module, x: Tensor, state, upstream: Optional[Dict[str, Tensor]], generator):
    """Outputs and gradients (by name) of one run; draws ``upstream`` (float64) when not given."""
    x = x.detach().clone().requires_grad_(True)
    inputs: Dict[str, Tensor] = {"x": x}
    if state is not None:
        state = [(h.detach().clone().requires_grad_(True), c.detach().clone().requires_grad_(True)) for h, c in state]
        for layer, (h, c) in enumerate(state):
            inputs[f"h0[{layer}]"] = h
            inputs[f"c0[{layer}]"] = c
    for name, p in module.named_parameters():
        inputs[name] = p
    out, states = run(x, state)
    outputs = _named_outputs(out, states)
    if upstream is None:
        upstream = {
            k: torch.randn(v.shape, generator=generator, dtype=torch.float64).to(v.device) for k, v in outputs.items()
        }
    names = list(outputs)
    grads = torch.autograd.grad(
        [outputs[n] for n in names],
        list(inputs.values()),
        [upstream[n].to(outputs[n].dtype) for n in names],
        allow_unused=True,
    )
    grads = {k: (torch.zeros_like(v) if g is None else g) for (k, v), g in zip(inputs.items(), grads)}
    return {k: v.detach() for k, v in outputs.items()}, grads, upstream


def reference_copy(module: nn.Module, dtype: torch.dtype = torch.float64) -> nn.Module:
    """A copy of ``module`` in ``dtype`` (default float64: its already-rounded parameters, upcast) on
    the reference backend."""
    ref = copy.deepcopy(getattr(module, "_orig_mod", module)).to(dtype)
    ref.backend = "reference"
    return ref


@contextlib.contextmanager
def exact_float32_convs():
    """cuDNN convolutions in full float32 (no TF32) inside, the user's setting restored after.

    Through ``torch.backends.cudnn.conv.fp32_precision`` where torch has it (reading the legacy
    ``allow_tf32`` raises there once a user has set the new per-operator flags)."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if hasattr(conv, "fp32_precision"):
        flags, name, off = conv, "fp32_precision", "ieee"
    else:
        flags, name, off = torch.backends.cudnn, "allow_tf32", False
    kept = getattr(flags, name)
    setattr(flags, name, off)
    try:
        yield
    finally:
        setattr(flags, name, kept)


def parity(run: Runner, module: nn.Module, x: Tensor, state=None, seed: int = 0, ref_module: Optional[nn.Module] = None) -> Parity:
    """Compare ``run`` (using ``module``'s parameters) with the float64 reference, forward and backward.

    ``x`` and ``state`` are in the dtype under test; the reference sees the same values upcast.
    Exceptions raised by the backend are caught and reported in :attr:`Parity.error`.
    """
    dtype = x.dtype
    res = Parity(dtype=str(dtype).replace("torch.", ""), fwd_tol=tolerance(dtype), bwd_tol=tolerance(dtype, backward=True))
    ref_module = ref_module if ref_module is not None else reference_copy(module)
    gen = torch.Generator().manual_seed(seed)
    x64 = x.detach().double()
    state64 = None if state is None else [(h.detach().double(), c.detach().double()) for h, c in state]
    ref_out, ref_grads, upstream = _forward_backward(module_runner(ref_module), ref_module, x64, state64, None, gen)
    # the backend gets the same upstream gradient, rounded to its dtype (the reference is not re-run)
    try:
        with exact_float32_convs():
            out, grads, _ = _forward_backward(run, getattr(module, "_orig_mod", module), x, state, upstream, gen)
    except Exception as e:  # noqa: BLE001 -- any failure of the backend is a verification failure
        res.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
        return res
    fwd = {name: scaled_error(out[name], ref) if name in out else float("inf") for name, ref in ref_out.items()}
    bwd = {name: scaled_error(grads[name], ref) if name in grads else float("inf") for name, ref in ref_grads.items()}
    over = [n for n, e in fwd.items() if e > res.fwd_tol] + [n for n, e in bwd.items() if e > res.bwd_tol]
    if over and dtype != torch.float64:  # only then: one more run, of the reference in this dtype
        try:
            same = reference_copy(module, dtype)
            with exact_float32_convs():
                s_out, s_grads, _ = _forward_backward(module_runner(same), same, x, state, upstream, gen)
        except Exception:  # noqa: BLE001 -- no same-dtype reference here (an op without that dtype): no allowance
            s_out = s_grads = {}
        for n in over:
            got, ref = (s_out, ref_out) if n in fwd else (s_grads, ref_grads)
            if n in got:
                res.same_dtype_reference[n] = scaled_error(got[n], ref[n])
    for errs, tol, kind in ((fwd, res.fwd_tol, "fwd"), (bwd, res.bwd_tol, "bwd")):
        allowed = {n: same_dtype_allowance(tol, res.same_dtype_reference[n]) if n in res.same_dtype_reference
                   else tol for n in errs}
        worst = max(errs, key=lambda n: errs[n] / allowed[n], default="")
        if worst:
            setattr(res, f"{kind}_err", errs[worst])
            setattr(res, f"{kind}_worst", worst)
            setattr(res, f"{kind}_tol", allowed[worst])
    return res


# ------------------------------------------------------------------------------------------------
# the sweep
# ------------------------------------------------------------------------------------------------
def device_dtypes(backend: str, device_type: str) -> List[torch.dtype]:
    """The dtypes to verify ``backend`` in on ``device_type`` (see the module docstring)."""
    if device_type == "cuda":
        candidates = [torch.float32, torch.float16, torch.bfloat16]
        default = candidates
    else:
        candidates = [torch.float32, torch.float64, torch.bfloat16]
        default = [torch.float32, torch.float64]
    provider = "reference" if backend == REFERENCE_OPS else backend
    if provider not in providers._PROVIDERS:
        return default
    try:
        claimed = set(providers.supported_dtypes(provider, device_type))
    except Exception:  # noqa: BLE001 -- an unimportable provider fails in parity, not here
        return default
    return [d for d in candidates if d in claimed]


def verify_targets(device_type: str, backends: Optional[Sequence[str]] = None) -> List[str]:
    """Implementations to check: ``reference-ops`` plus every available non-reference backend."""
    if backends is not None:
        return list(backends)
    return [REFERENCE_OPS] + [b for b in available_backends(device_type) if b != "reference"]


@dataclass
class VerifyRow:
    design: str
    shape: str
    backend: str
    parity: Parity = field(default_factory=lambda: Parity(dtype=""))

    def as_dict(self) -> dict:
        d = {"design": self.design, "shape": self.shape, "backend": self.backend}
        d.update(asdict(self.parity))
        d["ok"] = self.parity.ok
        return d


def _make_case(factory, shape: Shape, dtype: torch.dtype, device: torch.device, seed: int):
    torch.manual_seed(seed)
    module = factory(shape.Cin, list(shape.hidden), shape.k, "reference").double()
    # round the parameters to the dtype under test once; the reference sees these values upcast
    module = module.to(device=device, dtype=dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(shape.B, shape.T, shape.Cin, shape.H, shape.W, generator=gen, dtype=torch.float64)
    x = x.to(device=device, dtype=dtype)
    state = None
    if shape.with_state:
        state = []
        for C in shape.hidden:
            h = torch.randn(shape.B, C, shape.H, shape.W, generator=gen, dtype=torch.float64) * 0.5
            c = torch.randn(shape.B, C, shape.H, shape.W, generator=gen, dtype=torch.float64) * 0.5
            state.append((h.to(device=device, dtype=dtype), c.to(device=device, dtype=dtype)))
    return module, x, state


def run_verify(
    device: str = "cpu",
    quick: bool = False,
    backends: Optional[Sequence[str]] = None,
    dtypes: Optional[Sequence[torch.dtype]] = None,
    designs: Optional[Sequence[str]] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> List[VerifyRow]:
    """Every (backend, dtype, design, shape) comparison; see the module docstring."""
    dev = torch.device(device)
    shapes = QUICK_SHAPES if quick else SHAPES
    rows: List[VerifyRow] = []
    for backend in verify_targets(dev.type, backends):
        for dtype in (dtypes if dtypes is not None else device_dtypes(backend, dev.type)):
            for design in (designs if designs is not None else DESIGNS):
                for i, shape in enumerate(shapes):
                    if progress:
                        progress(f"{backend} {str(dtype).replace('torch.', '')} {design} {shape}")
                    module, x, state = _make_case(DESIGNS[design], shape, dtype, dev, seed=1000 + i)
                    if backend != REFERENCE_OPS:
                        module.backend = backend
                    res = parity(module_runner(module, backend), module, x, state, seed=i)
                    rows.append(VerifyRow(design, str(shape), backend, res))
    return rows


def format_table(rows: Sequence[VerifyRow]) -> str:
    header = ["backend", "dtype", "design", "shape", "fwd err", "fwd tol", "bwd err", "bwd tol", "worst (fwd / bwd)", "status"]
    body = []
    for r in rows:
        p = r.parity
        if p.error:
            body.append([r.backend, p.dtype, r.design, r.shape, "-", f"{p.fwd_tol:.0e}", "-", f"{p.bwd_tol:.0e}", p.error, "FAIL"])
            continue
        def tol(value, worst):  # "*": widened by the same-dtype reference's own error
            return f"{value:.1e}*" if worst in p.same_dtype_reference else f"{value:.0e}"

        body.append([
            r.backend, p.dtype, r.design, r.shape,
            f"{p.fwd_err:.2e}", tol(p.fwd_tol, p.fwd_worst), f"{p.bwd_err:.2e}", tol(p.bwd_tol, p.bwd_worst),
            f"{p.fwd_worst} / {p.bwd_worst}", "ok" if p.ok else "FAIL",
        ])
    widths = [max(len(str(row[i])) for row in [header] + body) for i in range(len(header))]
    fmt = lambda row: "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
    lines = [fmt(header), fmt(["-" * w for w in widths])] + [fmt(row) for row in body]
    if any(r.parity.same_dtype_reference for r in rows):
        lines.append(f"* tolerance widened to {SAME_DTYPE_MARGIN:g}x the error of the reference backend run in the "
                     f"same dtype, at most {SAME_DTYPE_CAP:g} (an ill-conditioned tensor)")
    return "\n".join(lines)


def summary(rows: Sequence[VerifyRow]) -> str:
    per: Dict[str, List[int]] = {}
    for r in rows:
        ok_fail = per.setdefault(r.backend, [0, 0])
        ok_fail[0 if r.parity.ok else 1] += 1
    parts = [f"{b}: {ok} ok, {bad} FAIL" for b, (ok, bad) in per.items()]
    return "; ".join(parts) if parts else "nothing to verify"


def main(device: Optional[str] = None, quick: bool = False, backends=None, dtypes=None, designs=None, out=None) -> int:
    """Print the parity table; return 1 if any comparison failed, else 0."""
    out = out if out is not None else sys.stdout
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    targets = verify_targets(torch.device(device).type, backends)
    print(f"verify on {device}: {', '.join(targets)} against the float64 reference "
          f"({'quick' if quick else 'full'} shapes); errors are max|x-ref|/max|ref|; a tensor over its "
          f"tolerance passes at up to {SAME_DTYPE_MARGIN:g}x the error of the reference run in the same dtype "
          f"(at most {SAME_DTYPE_CAP:g})", file=out)
    rows = run_verify(device, quick, backends, dtypes, designs)
    print(format_table(rows), file=out)
    failed = [r for r in rows if not r.parity.ok]
    print(f"\n{summary(rows)}", file=out)
    print("FAILED" if failed else "all backends match the reference", file=out)
    return 1 if failed or not rows else 0

"""The ``salstm-kernels`` command (also ``python -m salstm_kernels``): ``bench``, ``verify``, ``info``.

Argument parsing only; the work is in :mod:`salstm_kernels.bench` and :mod:`salstm_kernels.verify`.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import platform
import sys
from typing import List, Optional

import torch


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _csv(text: str) -> List[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


class UsageError(Exception):
    """A bad command-line value found after parsing: reported as argparse reports its own (exit 2)."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {value}")
    return value


def _kernel_size(text: str) -> int:
    value = _positive_int(text)
    if value % 2 == 0:
        raise argparse.ArgumentTypeError(f"expected an odd kernel size ('same' padding needs one), got {value}")
    return value


def _sizes(text: str):
    from .bench import parse_size

    try:
        sizes = [parse_size(s) for s in _csv(text)]
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if not sizes:
        raise argparse.ArgumentTypeError(f"size must be N or HxW with positive ints, got {text!r}")
    return sizes


def _device(text: str) -> str:
    """A device this machine has: ``cpu``, or ``cuda`` / ``cuda:N`` with CUDA present."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}") from None
    if device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index not in (None, 0)):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available here (torch {torch.__version__})")
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {count} CUDA device(s)")
    return text


def _names(text: str, known: List[str], what: str) -> List[str]:
    names = _csv(text)
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise UsageError(f"unknown {what} {unknown or text!r}; choose from {', '.join(known)}")
    return names


def _cmd_bench(args: argparse.Namespace) -> int:
    from . import bench

    device = args.device or _default_device()
    cfg = bench.BenchConfig.defaults(device, quick=args.quick)
    if args.size:
        cfg.sizes = [size for arg in args.size for size in arg]
    for name in ("batch", "channels", "in_channels", "steps", "layers", "kernel_size", "repeats", "dtype", "threads"):
        value = getattr(args, name)
        if value is not None:
            setattr(cfg, name, value)
    cfg.compile = not args.no_compile
    if args.compile_backend:
        cfg.compile_backend = args.compile_backend
    if args.backends is not None:
        from .backends import backend_names

        # "" (or only commas): no fused backend, the eager and compile rows alone
        cfg.backends = _names(args.backends, backend_names(), "backend(s)") if _csv(args.backends) else []
    return bench.main(cfg, args.out, progress=not args.no_progress)


def _cmd_verify(args: argparse.Namespace) -> int:
    from . import verify

    from .backends import backend_names
    from .bench import DTYPES

    dtypes = [DTYPES[d] for d in _names(args.dtypes, list(DTYPES), "dtype(s)")] if args.dtypes else None
    backends = _names(args.backends, [verify.REFERENCE_OPS, *backend_names()], "backend(s)") if args.backends else None
    designs = _names(args.designs, list(verify.DESIGNS), "design(s)") if args.designs else None
    if args.threads:
        torch.set_num_threads(args.threads)
    return verify.main(args.device, quick=args.quick, backends=backends, dtypes=dtypes, designs=designs)


def _cmd_info(args: argparse.Namespace) -> int:
    from . import __version__, cpp_extension
    from .backends import backend_status

    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    print(f"salstm_kernels {__version__}")
    print(f"python         {platform.python_version()} ({sys.executable})")
    print(f"torch          {torch.__version__}")
    # Triton is not imported here: its version comes from the installed distribution's metadata.
    print(f"triton         {version('triton') if importlib.util.find_spec('triton') else 'not installed'}")
    print(f"CUDA (torch)   {torch.version.cuda or 'none (CPU build)'}")
    print(f"threads        {torch.get_num_threads()}")
    print(f"cpp kernels    {cpp_extension.capability()}")
    devices = ["cpu"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print(f"cuda:{i}         {torch.cuda.get_device_name(i)}")
        devices.append("cuda")
    else:
        print("cuda           not available")
    for dev in ("cpu", "cuda"):
        print(f"\nbackends for {dev} tensors{'' if dev in devices else ' (no device here)'}:")
        for name, (ok, reason) in backend_status(dev).items():
            print(f"  {name:<10} {'available' if ok else 'unavailable: ' + reason}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="salstm-kernels", description="SA-LSTM / LSTM-SA kernels: benchmark, verify, info.")
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("bench", help="Table-III-style latency / memory / FLOPs benchmark (correctness-gated)",
                       description="Benchmark the separated LSTM-then-SA, SA-LSTM and LSTM-SA: eager reference, "
                                   "torch.compile of it, and every available fused backend.")
    b.add_argument("--batch", type=_positive_int, help="B (default: 2)")
    b.add_argument("--channels", type=_positive_int, help="hidden channels C (default: 32 on CPU, 64 on CUDA)")
    b.add_argument("--in-channels", type=_positive_int, help="input channels Cin (default: C)")
    b.add_argument("--size", nargs="+", type=_sizes, help="N or HxW; several (or comma-separated) for a sweep (default: 32 CPU, 112 CUDA)")
    b.add_argument("--steps", type=_positive_int, help="time steps T (default: 2)")
    b.add_argument("--layers", type=_positive_int, help="stacked ConvLSTM layers (default: 1)")
    b.add_argument("--kernel-size", type=_kernel_size, help="conv kernel size k (default: 5)")
    b.add_argument("--dtype", choices=["float32", "float64", "float16", "bfloat16"], help="default: float32")
    b.add_argument("--device", type=_device, help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)")
    b.add_argument("--repeats", type=_positive_int, help="CPU: timing samples per measurement; CUDA: do_bench runs repeats x 10 ms (default: 10)")
    b.add_argument("--threads", type=_positive_int, help="CPU intra-op threads for the run (default: torch's); 1 is steadiest on a busy machine")
    b.add_argument("--quick", action="store_true", help="tiny shapes, few timing samples, compile with aot_eager: a smoke run")
    b.add_argument("--out", default="bench-results", help="directory for bench.json, bench.csv, bench.png (default: %(default)s)")
    b.add_argument("--backends", help="comma-separated fused backends to run (default: every available one; '' for none)")
    b.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    b.add_argument("--compile-backend", help="torch.compile backend (default: inductor; aot_eager with --quick)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.set_defaults(func=_cmd_bench, subparser=b)

    v = sub.add_parser("verify", help="parity of every available backend with the reference (exit 1 on failure)",
                       description="Forward outputs and every gradient of every available backend against the "
                                   "float64 reference, over dtypes, designs and odd shapes.")
    v.add_argument("--device", type=_device, help="default: cuda if available, else cpu")
    v.add_argument("--quick", action="store_true", help="two small shapes instead of five")
    v.add_argument("--backends", help="comma-separated backends to check (default: reference-ops + every available one)")
    v.add_argument("--dtypes", help="comma-separated dtypes (default: per device and backend)")
    v.add_argument("--threads", type=_positive_int, help="CPU intra-op threads (default: torch's)")
    v.add_argument("--designs", help="comma-separated designs, e.g. 'SALSTM2d(linear),ConvLSTM2d'")
    v.set_defaults(func=_cmd_verify, subparser=v)

    i = sub.add_parser("info", help="versions, devices and available backends (and why others are not)")
    i.set_defaults(func=_cmd_info, subparser=i)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UsageError as e:
        args.subparser.error(str(e))  # the subcommand's usage line, as for its argparse errors


if __name__ == "__main__":
    sys.exit(main())

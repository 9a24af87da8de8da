#!/usr/bin/env python
"""2.5D segmentation with SA-LSTM / LSTM-SA on synthetic MONAI volumes, end to end, offline.

    python examples/segmentation_25d.py                       # SA-LSTM, volume strategy, CPU, ~minutes
    python examples/segmentation_25d.py --design lstm_then_sa # the separated baseline (paper Fig. 2a)
    python examples/segmentation_25d.py --strategy unet       # module between a 2D U-Net's encoder and decoder
    python examples/segmentation_25d.py --compare-backends    # reference vs the best fused backend

Data: ``monai.data.synthetic.create_test_image_3d`` volumes (fixed seeds), cut along the last axis
into three-adjacent-slice stacks labelled with the centre slice; whole volumes go to either the
training or the validation split.

Networks (built from ``monai.networks.blocks``):

* ``--strategy volume`` (paper Fig. 4b): one shared 2D encoder runs on each of the three slices, a
  :class:`salstm_kernels.SliceFusion2d` layer fuses the three bottleneck feature maps
  (forward net on (x1, x2), reverse net on (x3, x2), 1x1 conv), and a 2D decoder with skip
  connections from the centre slice's encoder produces the centre slice's segmentation.
* ``--strategy unet`` (paper Fig. 4a, "between encoder and decoder"): a 2D U-Net whose input is the
  three slices as channels; the module runs on the bottleneck (as a sequence of one step).

Loss: ``DiceCELoss`` with ``lambda_dice = lambda_ce = 0.5`` (paper IV-H).  Evaluation: predicted
slices are put back into volumes, then per-class Dice (``DiceMetric``) and HD95
(``HausdorffDistanceMetric(percentile=95)``, in voxels) per validation volume, averaged.

Needs the ``examples`` extra: ``pip install monai matplotlib tqdm`` (scipy is used by MONAI's HD95).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

try:
    import salstm_kernels
except ImportError:  # running from a source checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import salstm_kernels
from salstm_kernels import ConvLSTM2d, LSTMSA2d, LSTMThenSA2d, SALSTM2d, SliceFusion2d

try:
    import monai
    from monai.data.synthetic import create_test_image_3d
    from monai.losses import DiceCELoss
    from monai.metrics import DiceMetric, HausdorffDistanceMetric
    from monai.networks.blocks import Convolution, ResidualUnit, UpSample
    from monai.networks.utils import one_hot
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise SystemExit(
        f"this example needs MONAI ({exc}); install the extra: pip install monai matplotlib tqdm"
    ) from exc

DESIGNS = {
    "salstm": SALSTM2d,
    "lstmsa": LSTMSA2d,
    "lstm_then_sa": LSTMThenSA2d,
    "convlstm": ConvLSTM2d,
}
DESIGN_TITLES = {
    "salstm": "SA-LSTM",
    "lstmsa": "LSTM-SA",
    "lstm_then_sa": "separated LSTM then SA",
    "convlstm": "ConvLSTM only",
}


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------
def make_volumes(count: int, size: int, depth: int, seed: int, num_seg_classes: int, noise: float):
    """``count`` synthetic volumes ``(image, label)``, each ``(size, size, depth)``; seeds ``seed + i``."""
    rad_max = max(2, min(size // 6, (min(size, depth) - 1) // 2))
    rad_min = max(1, rad_max // 2)
    vols = []
    for i in range(count):
        rs = np.random.RandomState(seed + i)
        img, seg = create_test_image_3d(
            size, size, depth, num_objs=6, rad_max=rad_max, rad_min=rad_min,
            noise_max=noise, num_seg_classes=num_seg_classes, random_state=rs,
        )
        vols.append((img.astype(np.float32), seg.astype(np.int64)))
    return vols


def slice_stacks(volumes) -> Tuple[Tensor, Tensor]:
    """Three-adjacent-slice stacks along the last axis: images ``(S, 3, H, W)``, centre labels ``(S, 1, H, W)``.

    Every interior slice of every volume, in volume-then-slice order (so predictions reshape back
    into ``(V, D - 2, H, W)``).
    """
    xs, ys = [], []
    for img, seg in volumes:
        img_t = torch.from_numpy(np.moveaxis(img, -1, 0))  # (D, H, W)
        seg_t = torch.from_numpy(np.moveaxis(seg, -1, 0))
        for z in range(1, img_t.shape[0] - 1):
            xs.append(img_t[z - 1 : z + 2])
            ys.append(seg_t[z : z + 1])
    return torch.stack(xs), torch.stack(ys)


def make_data(args) -> Dict[str, Tensor]:
    vols = make_volumes(args.volumes + args.val_volumes, args.size, args.depth, args.seed,
                        args.num_classes - 1, args.noise)
    x_tr, y_tr = slice_stacks(vols[: args.volumes])
    x_va, y_va = slice_stacks(vols[args.volumes :])
    return {"x_train": x_tr, "y_train": y_tr, "x_val": x_va, "y_val": y_va}


# ---------------------------------------------------------------------------------------------
# networks
# ---------------------------------------------------------------------------------------------
class Encoder2d(nn.Module):
    """MONAI residual units; level 0 at full resolution, each further level halves H and W."""

    def __init__(self, in_channels: int, channels: Sequence[int]):
        super().__init__()
        levels = []
        for i, ch in enumerate(channels):
            cin = in_channels if i == 0 else channels[i - 1]
            levels.append(ResidualUnit(2, cin, ch, strides=1 if i == 0 else 2, kernel_size=3, subunits=2))
        self.levels = nn.ModuleList(levels)

    def forward(self, x: Tensor) -> List[Tensor]:
        feats = []
        for level in self.levels:
            x = level(x)
            feats.append(x)
        return feats


class Decoder2d(nn.Module):
    """Transposed-conv upsampling (MONAI ``UpSample``), concat with the skip, a residual unit; 1x1 head."""

    def __init__(self, bottleneck_channels: int, channels: Sequence[int], num_classes: int):
        super().__init__()
        ups, fuses = [], []
        cin = bottleneck_channels
        for skip_ch in reversed(channels[:-1]):
            ups.append(UpSample(2, cin, skip_ch, scale_factor=2, mode="deconv"))
            fuses.append(ResidualUnit(2, 2 * skip_ch, skip_ch, kernel_size=3, subunits=2))
            cin = skip_ch
        self.ups, self.fuses = nn.ModuleList(ups), nn.ModuleList(fuses)
        self.head = Convolution(2, cin, num_classes, kernel_size=1, conv_only=True)

    def forward(self, x: Tensor, skips: Sequence[Tensor]) -> Tensor:
        for up, fuse, skip in zip(self.ups, self.fuses, reversed(skips)):
            x = fuse(torch.cat([up(x), skip], dim=1))
        return self.head(x)


class VolumeFusionNet(nn.Module):
    """Paper Fig. 4b: shared 2D encoder on three slices -> SliceFusion2d -> 2D decoder (centre slice skips)."""

    def __init__(self, module_cls, channels: Sequence[int], hidden: int, num_classes: int, kernel_size: int, backend: str):
        super().__init__()
        self.encoder = Encoder2d(1, channels)
        # SliceFusion2d's 1x1 conv maps the two directions to ``channels[-1]`` fused feature channels.
        self.fusion = SliceFusion2d(module_cls, channels[-1], hidden, channels[-1], kernel_size, backend=backend)
        self.decoder = Decoder2d(channels[-1], channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:  # x (B, 3, H, W)
        b = x.shape[0]
        feats = self.encoder(x.transpose(0, 1).reshape(3 * b, 1, *x.shape[-2:]))  # one pass, 3B slices
        f1, f2, f3 = feats[-1].split(b)
        fused = self.fusion(f1, f2, f3)
        skips = [f[b : 2 * b] for f in feats[:-1]]  # the centre slice's encoder features
        return self.decoder(fused, skips)


class UNetBottleneckNet(nn.Module):
    """Paper Fig. 4a (between encoder and decoder): 2D U-Net on the 3 slices as channels, module at the bottleneck."""

    def __init__(self, module_cls, channels: Sequence[int], hidden: int, num_classes: int, kernel_size: int, backend: str):
        super().__init__()
        self.encoder = Encoder2d(3, channels)
        self.module = module_cls(channels[-1], hidden, kernel_size, backend=backend)
        self.decoder = Decoder2d(hidden, channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        feats = self.encoder(x)
        return self.decoder(self.module(feats[-1]), feats[:-1])


def build_model(args, backend: str) -> nn.Module:
    torch.manual_seed(args.seed)
    cls = VolumeFusionNet if args.strategy == "volume" else UNetBottleneckNet
    return cls(DESIGNS[args.design], args.channels, args.hidden, args.num_classes, args.kernel_size, backend)


# ---------------------------------------------------------------------------------------------
# training and evaluation
# ---------------------------------------------------------------------------------------------
def make_loss() -> nn.Module:
    return DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=0.5, lambda_ce=0.5)


def train(model: nn.Module, data, args, device, max_steps: Optional[int], progress: bool = True, desc: str = "train"):
    """Adam on shuffled mini-batches (order fixed by ``args.seed``). Returns losses and per-iteration seconds."""
    from tqdm.auto import tqdm

    model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    loss_fn = make_loss()
    x_all, y_all = data["x_train"], data["y_train"]
    n = x_all.shape[0]
    per_epoch = math.ceil(n / args.batch_size)
    total = args.epochs * per_epoch if max_steps is None else max_steps
    gen = torch.Generator().manual_seed(args.seed)
    losses: List[float] = []
    times: List[float] = []
    bar = tqdm(total=total, desc=desc, disable=not progress, dynamic_ncols=True, file=sys.stdout)
    step = 0
    while step < total:
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, args.batch_size):
            if step >= total:
                break
            idx = order[start : start + args.batch_size]
            x, y = x_all[idx].to(device), y_all[idx].to(device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            value = loss.item()  # synchronises
            times.append(time.perf_counter() - t0)
            losses.append(value)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}", epoch=(step - 1) // per_epoch + 1)
            if not math.isfinite(value):
                bar.close()
                raise FloatingPointError(f"loss became {value} at step {step}")
    bar.close()
    return {"losses": losses, "iter_s": times}


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, device, batch_size: int) -> Tensor:
    model.to(device).eval()
    out = [model(x[i : i + batch_size].to(device)).argmax(1).cpu() for i in range(0, x.shape[0], batch_size)]
    return torch.cat(out)  # (S, H, W)


def evaluate(pred: Tensor, label: Tensor, num_volumes: int, num_classes: int) -> Dict[str, object]:
    """Per-class Dice and HD95 on the slices put back into volumes ``(V, K, H, W, D-2)``.

    A class whose prediction is empty in a volume (where it is present in the label) has no HD95:
    MONAI returns NaN there; it is left out of that class's mean and counted in ``hd95_missing``.
    """
    def to_volumes(t: Tensor) -> Tensor:
        v = t.reshape(num_volumes, -1, *t.shape[-2:]).permute(0, 2, 3, 1)  # (V, H, W, D-2)
        return one_hot(v.unsqueeze(1), num_classes=num_classes)

    p, y = to_volumes(pred), to_volumes(label.squeeze(1))
    dice = DiceMetric(include_background=False, reduction="none")(p, y)  # (V, K-1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is all 0, this may result in nan/inf distance.*")
        warnings.filterwarnings("ignore", category=FutureWarning, module="monai")
        hd95 = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")(p, y)
    rows = []
    for k in range(num_classes - 1):
        rows.append({
            "class": k + 1,
            "dice": float(torch.nanmean(dice[:, k])),
            "hd95": float(torch.nanmean(hd95[:, k])),
            "hd95_missing": int(torch.isnan(hd95[:, k]).sum()),
        })
    mean = {
        "class": "mean",
        "dice": float(np.nanmean([r["dice"] for r in rows])) if rows else float("nan"),
        "hd95": float(np.nanmean([r["hd95"] for r in rows])) if rows else float("nan"),
        "hd95_missing": sum(r["hd95_missing"] for r in rows),
    }
    return {"per_class": rows, "mean": mean}


def format_table(metrics: Dict[str, object], title: str) -> str:
    lines = [title, f"{'class':<8}{'Dice':>8}{'HD95 (vox)':>12}"]
    for r in metrics["per_class"] + [metrics["mean"]]:
        name = str(r["class"])
        note = f"  ({r['hd95_missing']} vol. with empty prediction)" if r["hd95_missing"] else ""
        lines.append(f"{name:<8}{r['dice']:>8.4f}{r['hd95']:>12.2f}{note}")
    return "\n".join(lines)


def save_overlay(path: str, image: Tensor, label: Tensor, pred: Tensor, num_classes: int, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    colours = ["none", "tab:red", "tab:green", "tab:blue", "tab:orange", "tab:purple"][:num_classes]
    cmap = ListedColormap([(0, 0, 0, 0)] + [matplotlib.colors.to_rgba(c, 0.45) for c in colours[1:]])
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.3))
    for ax, (name, mask) in zip(axes, [("image (centre slice)", None), ("ground truth", label), ("prediction", pred)]):
        ax.imshow(image.numpy(), cmap="gray")
        if mask is not None:
            ax.imshow(mask.numpy(), cmap=cmap, vmin=0, vmax=num_classes - 1, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# drop-in proof: reference vs fused backend
# ---------------------------------------------------------------------------------------------
def pick_fused_backend(device: torch.device) -> Tuple[Optional[str], Dict[str, Tuple[bool, str]]]:
    """The best fused backend that can run on ``device`` (cuda: triton, then cpp; cpu: cpp, then triton)."""
    status = salstm_kernels.backend_status(device.type)
    available = salstm_kernels.available_backends(device)
    order = ("triton", "cpp") if device.type == "cuda" else ("cpp", "triton")
    for name in order:
        if name in available:
            return name, status
    return None, status


def compare_backends(args, data, device) -> Dict[str, object]:
    fused, status = pick_fused_backend(device)
    if fused is None:
        reasons = "; ".join(f"{k}: {why}" for k, (ok, why) in status.items() if k != "reference" and not ok)
        print(f"No fused backend is available on {device.type} ({reasons}).")
        print("Only 'reference' can run here; comparing it with itself proves nothing, so the comparison is skipped.")
        return {"skipped": True, "reason": reasons}
    note = " (Triton interpreter: timings are not meaningful)" if fused == "triton" and device.type == "cpu" else ""
    print(f"Comparing backend 'reference' with '{fused}' on {device.type}{note}: "
          f"seed {args.seed}, {args.compare_steps} steps, same initial weights and batches.")
    runs = {}
    for backend in ("reference", fused):
        model = build_model(args, backend)
        runs[backend] = train(model, data, args, device, args.compare_steps, progress=not args.no_progress, desc=backend)
    ref, fus = runs["reference"]["losses"], runs[fused]["losses"]
    print(f"{'step':>4}  {'loss reference':>15}  {'loss ' + fused:>15}  {'|diff|':>10}  {'ms ref':>8}  {'ms ' + fused:>8}")
    for i, (a, b) in enumerate(zip(ref, fus)):
        print(f"{i + 1:>4}  {a:>15.7f}  {b:>15.7f}  {abs(a - b):>10.2e}  "
              f"{1e3 * runs['reference']['iter_s'][i]:>8.1f}  {1e3 * runs[fused]['iter_s'][i]:>8.1f}")
    max_rel = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(ref, fus))
    agree = max_rel <= args.compare_rtol
    t_ref, t_fus = _median_iter(runs["reference"]["iter_s"]), _median_iter(runs[fused]["iter_s"])
    print(f"time per iteration (median, first step excluded): reference {1e3 * t_ref:.1f} ms, "
          f"{fused} {1e3 * t_fus:.1f} ms (x{t_ref / t_fus:.2f})")
    print(f"loss trajectories {'AGREE' if agree else 'DISAGREE'}: max relative difference {max_rel:.2e} "
          f"(tolerance {args.compare_rtol:.0e})")
    return {"skipped": False, "fused": fused, "losses": {k: v["losses"] for k, v in runs.items()},
            "iter_s": {"reference": t_ref, fused: t_fus}, "max_rel_diff": max_rel, "agree": agree}


def _median_iter(times: Sequence[float]) -> float:
    return statistics.median(times[1:] if len(times) > 1 else times)


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--design", choices=sorted(DESIGNS), default="salstm", help="module between encoder and decoder")
    p.add_argument("--strategy", choices=("volume", "unet"), default="volume",
                   help="volume: three slices, shared encoder, SliceFusion2d (Fig. 4b); unet: module at a 2D U-Net's bottleneck")
    p.add_argument("--backend", default="auto", help="salstm_kernels backend: auto, reference, cpp, triton")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--steps", type=int, default=None, help="stop after this many training steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--volumes", type=int, default=8, help="training volumes")
    p.add_argument("--val-volumes", type=int, default=2, help="validation volumes")
    p.add_argument("--size", type=int, default=64, help="slice height and width")
    p.add_argument("--depth", type=int, default=24, help="slices per volume")
    p.add_argument("--num-classes", type=int, default=3, help="including background")
    p.add_argument("--noise", type=float, default=0.5, help="noise_max of create_test_image_3d")
    p.add_argument("--channels", type=int, nargs="+", default=[16, 32, 32], help="encoder channels per level")
    p.add_argument("--hidden", type=int, default=32, help="hidden channels of the LSTM module")
    p.add_argument("--kernel-size", type=int, default=5, help="ConvLSTM kernel size")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "segmentation_25d"))
    p.add_argument("--compare-backends", action="store_true",
                   help="instead of training: run --compare-steps steps with 'reference' and the best fused backend, same seed")
    p.add_argument("--compare-steps", type=int, default=5)
    p.add_argument("--compare-rtol", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    args = p.parse_args(argv)
    if len(args.channels) < 2:
        p.error("--channels needs at least two levels")
    if args.size % 2 ** (len(args.channels) - 1):
        p.error(f"--size must be divisible by {2 ** (len(args.channels) - 1)}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    os.makedirs(args.out, exist_ok=True)
    data = make_data(args)
    print(f"salstm_kernels {salstm_kernels.__version__}, MONAI {monai.__version__}, torch {torch.__version__}, "
          f"device {device}, backends available: {salstm_kernels.available_backends(device)}")
    print(f"data: {data['x_train'].shape[0]} training / {data['x_val'].shape[0]} validation three-slice stacks "
          f"of {args.size}x{args.size} ({args.volumes}/{args.val_volumes} volumes, {args.num_classes} classes)")

    if args.compare_backends:
        result = {"compare": compare_backends(args, data, device)}
        with open(os.path.join(args.out, "compare_backends.json"), "w") as f:
            json.dump(result, f, indent=2)
        return result

    model = build_model(args, args.backend)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {DESIGN_TITLES[args.design]}, strategy {args.strategy}, backend {args.backend!r} "
          f"(resolves to {salstm_kernels.backends.resolve_backend(args.backend, device)!r}), {n_params / 1e3:.1f}k parameters")
    hist = train(model, data, args, device, args.steps, progress=not args.no_progress)
    t_iter = _median_iter(hist["iter_s"])
    n = len(hist["losses"])
    k = max(1, min(5, n // 4 or 1))
    print(f"trained {n} steps: loss {statistics.mean(hist['losses'][:k]):.4f} (first {k}) -> "
          f"{statistics.mean(hist['losses'][-k:]):.4f} (last {k}); {1e3 * t_iter:.1f} ms/iteration (median)")

    pred = predict(model, data["x_val"], device, args.batch_size)
    metrics = evaluate(pred, data["y_val"], args.val_volumes, args.num_classes)
    table = format_table(metrics, f"validation ({args.val_volumes} volumes), {DESIGN_TITLES[args.design]}, {args.strategy} strategy:")
    print(table)

    fg = (data["y_val"].squeeze(1) > 0).flatten(1).sum(1)
    s = int(fg.argmax())
    png = os.path.join(args.out, f"val_overlay_{args.design}_{args.strategy}.png")
    save_overlay(png, data["x_val"][s, 1], data["y_val"][s, 0], pred[s], args.num_classes,
                 f"{DESIGN_TITLES[args.design]} ({args.strategy}), validation slice {s}, mean Dice {metrics['mean']['dice']:.3f}")
    print(f"wrote {png}")
    result = {"args": vars(args), "losses": hist["losses"], "iter_s_median": t_iter, "metrics": metrics,
              "table": table, "png": png}
    with open(os.path.join(args.out, f"result_{args.design}_{args.strategy}.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    _result = main()
    if not _result.get("compare", {}).get("agree", True):
        sys.exit(1)  # the fused backend's losses left the tolerance

"""Compile the channel-blocked attention kernels for sm_90 without a GPU; print shared memory,
registers, spills and resident blocks per SM per variant (ptxas from Triton's NVIDIA backend).  Also the cell and
single-pass (C <= 64) backward kernels, each with the state gradients given and absent
(HAS_DH / HAS_DCN False: a branch the interpreter runs but does not compile), and the single-pass
kernels with the tiles and warps of the shipped ``GPU_LAUNCH`` table (lines ``shipped ...``).

    PYTHONPATH=. python -m salstm_kernels.triton.sm90_stats                 # NCHW tensors
    SM90_LAYOUT=1 PYTHONPATH=. python -m salstm_kernels.triton.sm90_stats   # channels_last tensors
    SM90_FP32_PREC=tf32x3 ...                                                # float32 dots as tf32x3
    PYTHONPATH=. python -m salstm_kernels.triton.sm90_stats --each-kernel   # every kernel compiles, each LAYOUT
    PYTHONPATH=. python -m salstm_kernels.triton.sm90_stats --stages        # C = 64 kernels at depths 1, 2, 3

``C`` is a runtime argument of every blocked kernel, so one binary per (kernel, dtype, combination,
gated) serves every ``C``; the on-chip footprint depends only on ``BLOCK_C`` and the N tiles.
"""
from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import attention_blocked as bk
from . import attention_partials as ap
from . import lstm_attention as sp
from . import lstm_cell as cl
from .lstm_attention import BLOCK_C

SMEM_LIMIT = 227 * 1024
#: sm_90 per-SM resources (CUDA occupancy rules): shared memory (the driver reserves 1 KiB per
#: block), 64K registers (allocated per warp in 256-register units), 64 warps, 32 blocks.
SM_SMEM, SM_REGS, SM_WARPS, SM_BLOCKS = 228 * 1024, 65536, 64, 32
DTYPES = tuple(os.environ.get("SM90_DTYPES", "fp32,bf16,fp16").split(","))
#: float32's ``tl.dot`` precision in the variants table: "ieee" (the default) or "tf32x3" (``Launch.prec``).
FP32_PREC = os.environ.get("SM90_FP32_PREC", "ieee")
#: The kernels' ``LAYOUT`` (``lstm_cell.LAYOUTS``): 0 NCHW, 1 channels_last, 2 NCHW 64-bit gate stride.
LAYOUT = int(os.environ.get("SM90_LAYOUT", "0"))
_TORCH = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: Every pointer argument name of the kernels (a kernel takes the ones it has).
_PTR_NAMES = ("a_ptr", "c_ptr", "h_ptr", "cn_ptr", "o_ptr", "hsrc_ptr", "do_ptr", "dh_ptr", "dcn_ptr", "da_ptr",
              "dc_ptr", "wq_ptr", "bq_ptr", "wk_ptr", "bk_ptr", "wv_ptr", "bv_ptr", "bias_ptr", "apart_ptr")


def blocks_per_sm(smem: int, regs: int, warps: int) -> int:
    """Resident blocks per SM for a kernel using ``smem`` bytes of shared memory and ``regs``
    registers per thread with ``warps`` warps per block: what bounds the warps in flight (latency
    hiding) of the streaming kernels here."""
    regs_per_warp = -(-regs * 32 // 256) * 256
    by_regs = SM_REGS // (regs_per_warp * warps)
    by_smem = SM_SMEM // (smem + 1024) if smem else SM_BLOCKS
    return min(by_regs, by_smem, SM_WARPS // warps, SM_BLOCKS)


def _w16(dt: str, gated: bool) -> bool:
    """The ``W16`` constexpr as ``_Plan`` / ``_BlockedPlan`` set it for storage type ``dt``."""
    return gated and sp._weight_dots_16bit(_TORCH[dt])


def _all_ptrs(dt):
    """Every tensor of a kernel in storage type ``dt``."""
    return {n: dt for n in _PTR_NAMES}


def _sm90_ptxas() -> str:
    """The ptxas this Triton runs for sm_90 (triton 3.6: CUDA 12.8's ``ptxas``; 3.9: the newer
    ``ptxas-blackwell``).  They allocate registers differently: the counts must come from the one
    the GPU's Triton runs."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(90).path
    except Exception:  # noqa: BLE001  (another Triton layout: its bundled binary)
        return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


_PTXAS = _sm90_ptxas()


def _compile(fn, ptr_types, consts, num_warps, num_stages=0):
    """Shared memory, registers, spill stores / loads of one sm_90 compile; ``num_stages`` 0: Triton's
    default (3 on sm_90), as a launch without the option."""
    if "LAYOUT" in fn.arg_names:  # the tensors' layout (SM90_LAYOUT)
        consts = {"LAYOUT": LAYOUT, **consts}
    # constexprs left out take their defaults, as a launch without them does (not runtime ints)
    consts = {**{p.name: p.default for p in fn.params if p.is_constexpr and p.default is not inspect.Parameter.empty},
              **consts}
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + ptr_types.get(name, "fp32")
        elif name == "scale":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    # what a launch specializes on: 16-byte aligned pointers (every fresh torch tensor), and C, N
    # multiples of 16 (C = 64 at 224x224, as measured) -- without these hints the compiler cannot
    # vectorize 16-bit loads nor pipeline them (cp.async), and the counts differ from the launches'
    hinted = [i for i, name in enumerate(fn.arg_names)
              if sig[name] != "constexpr" and (name.endswith("_ptr") or name in ("C", "N"))]
    attrs = {(i,): [["tt.divisibility", 16]] for i in hinted}
    options = dict(num_warps=num_warps, **({"num_stages": num_stages} if num_stages else {}))
    k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32), options=options)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(k.asm["ptx"])
    try:
        log = subprocess.run([_PTXAS, "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull],
                             capture_output=True, text=True).stderr
    finally:
        os.unlink(f.name)
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return k.metadata.shared, regs, int(spill.group(1)), int(spill.group(2))


def variants():
    BC, BNR, W = BLOCK_C, 64, 8
    for dt in DTYPES:
        prec = FP32_PREC if dt == "fp32" else "tf32"
        BN = 32  # _BlockedPlan: 16 for gated float32 calls (every rows kernel of the call)
        a = {"a_ptr": dt, "c_ptr": dt}
        w = {p: dt for p in ("wq_ptr", "bq_ptr", "wk_ptr", "bk_ptr", "wv_ptr", "bv_ptr")}
        for comb, gated in ((0, False), (1, False), (0, True), (1, True), (2, True)):
            tag = f"{dt} comb={comb} gated={int(gated)}"
            BN = 16 if gated and dt == "fp32" else 32
            w16 = {"W16": _w16(dt, gated)}
            for write, hs in ((True, dt), (False, "fp32")) if not gated else ((False, dt), (False, "fp32")):
                yield (f"qkv_rows {tag} hsrc={hs}", bk.qkv_rows_kernel,
                       {**a, **w, "hsrc_ptr": hs, "h_ptr": hs, "cn_ptr": hs},
                       dict(BC=BC, BN=BN, COMB=comb, GATED=gated, WRITE_STATE=write, PREC=prec, **w16), W)
            if gated:
                yield (f"proj_grad_rows {tag}", bk.proj_grad_rows_kernel, {**a, **w},
                       dict(BC=BC, BN=BN, COMB=comb, PREC=prec, **w16), W)
            yield (f"attention_bwd_rows {tag}", bk.attention_bwd_rows_kernel,
                   {**a, **w, "dh_ptr": dt, "dcn_ptr": dt, "da_ptr": dt, "dc_ptr": dt},
                   dict(BC=BC, BN=BN, COMB=comb, GATED=gated, PREC=prec, **w16), W)
            if gated:  # attention_matmul (C >= MATMUL_PRODUCTS_MIN_C, or routed at C = 64): projections read
                pp = {n: dt for n in ("hsrc_ptr", "h_ptr", "cn_ptr", "pq_ptr", "pk_ptr", "pv_ptr", "q_ptr", "k_ptr",
                                      "v_ptr", "dqa_ptr", "dka_ptr", "dva_ptr", "dq_ptr", "dk_ptr", "dv_ptr",
                                      "dfq_ptr", "dfk_ptr", "dfv_ptr", "wdq_ptr")}
                mm = dict(BC=BC, BN=sp.MATMUL_ROWS_BLOCK_N, COMB=comb, PREC=prec, PROJ=True, HAS_BIAS=True)
                yield (f"qkv_rows {tag} PROJ", bk.qkv_rows_kernel, {**a, **w, **pp},
                       dict(mm, GATED=True, WRITE_STATE=False), W)
                yield (f"proj_grad_rows {tag} PROJ", bk.proj_grad_rows_kernel, {**a, **w, **pp}, mm, W)
                yield (f"attention_bwd_rows {tag} PROJ", bk.attention_bwd_rows_kernel,
                       {**a, **w, **pp, "dh_ptr": dt, "dcn_ptr": dt, "da_ptr": dt, "dc_ptr": dt},
                       dict(mm, GATED=True), W)
        for xt, yt, rs in ((  "fp32", "fp32", False), (dt, "fp32", False), ("fp32", "fp32", True)):
            yield (f"abt_partials {dt} x={xt} rowsum={int(rs)}", bk.abt_partials_kernel,
                   {"x_ptr": xt, "y_ptr": yt}, dict(BC=BC, BN=BNR, ROWSUM=rs, PREC=prec), W)
        # the backward kernels with dh / dc' given, and absent (None: masked out, read as zero)
        grads = {"dh_ptr": dt, "dcn_ptr": dt, "da_ptr": dt, "dc_ptr": dt}
        for has in ((True, True), (False, False), (False, True)):
            flags = dict(HAS_DH=has[0], HAS_DCN=has[1])
            tag = f"{dt} HAS_DH={int(has[0])} HAS_DCN={int(has[1])}"
            yield (f"cell_bwd {tag}", cl._cell_bwd_kernel, {**a, **grads}, dict(BLOCK=1024, **flags), 4)
            # with the conv bias: programs that also sum dA for its gradient (NCHW planes / NHWC
            # pixels); GATES=3: from a zero state (t = 0: A rows i, o, g)
            for gates in (4, 3):
                if LAYOUT != 1:
                    yield (f"cell_bwd_plane {tag} GATES={gates}", cl._cell_bwd_plane_kernel, {**a, **grads},
                           dict(BLOCK=1024, GATES=gates, **flags), 4)
                else:
                    yield (f"cell_bwd_pixels {tag} GATES={gates}", cl._cell_bwd_pixels_kernel, {**a, **grads},
                           dict(BP=16, CP=64, GATES=gates, **flags), 4)
            for gated in (False, True):
                rows = dict(BC=BC, BN=16 if gated and dt == "fp32" else 32, COMB=0, GATED=gated, PREC=prec,
                            W16=_w16(dt, gated), **flags)
                yield (f"attention_bwd_rows {tag} gated={int(gated)}", bk.attention_bwd_rows_kernel,
                       {**a, **w, **grads}, rows, W)
                if all(has):  # as the modules launch it: the conv bias folded in, its gradient summed
                    yield (f"attention_bwd_rows {tag} gated={int(gated)} +bias", bk.attention_bwd_rows_kernel,
                           {**a, **w, **grads}, dict(rows, HAS_BIAS=True), W)
                yield (f"attention_bwd single-pass C64 {tag} gated={int(gated)}", sp._attention_bwd_kernel,
                       {**a, **w, **grads, "do_ptr": dt},
                       dict(CP=64, BN=16, COMB=0, GATED=gated, PREC=prec, W16=_w16(dt, gated), **flags), W)
        BN = 32
        for xt, ot, tr in (("fp32", dt, False), (dt, dt, False), ("fp32", "fp32", False), (dt, "fp32", True),
                           ("fp32", "fp32", True)):
            for bn in (BN, 16) if dt == "fp32" else (BN,):
                yield (f"mm_rows {dt} x={xt} out={ot} trans={int(tr)} BN={bn}", bk.mm_rows_kernel,
                       {"x_ptr": xt, "o_ptr": ot}, dict(TRANS=tr, BC=BC, BN=bn, PREC=prec), W)


def _single_pass_kernels(dt, backward, gated, launch):
    """The single-pass kernels of one direction at C = 64 as ``launch`` launches them, with the conv
    bias folded in (what the modules launch): ``(fn, ptr types, constexprs)``."""
    prec = (launch.prec or "ieee") if dt == "fp32" else "tf32"
    consts = dict(CP=64, BN=launch.bn, COMB=0, GATED=gated, PREC=prec, W16=_w16(dt, gated), HAS_BIAS=True)
    # HAS_DH / HAS_DCN as constexprs, as launched (left out they compile as runtime ints)
    has = dict(HAS_DH=True, HAS_DCN=True)
    bwd = {**consts, **has, "DW_APART": gated and launch.dw_apart}
    kernels = (((sp._scores_grad_kernel, consts), (sp._attention_bwd_kernel, bwd)) if backward
               else ((sp._cell_qk_scores_kernel, consts), (sp._attention_out_kernel, consts)))
    return [(fn, _all_ptrs(dt), {k: v for k, v in kc.items() if k in fn.arg_names}) for fn, kc in kernels]


def _dtypes_of(fp32):
    return [dt for dt in (("fp32",) if fp32 else ("bf16", "fp16")) if dt in DTYPES]


def shipped_single_pass():
    """The single-pass kernels as the shipped GPU_LAUNCH table launches them at C = 64."""
    for (path, backward, gated, fp32), launch in sorted(sp.GPU_LAUNCH.items()):
        if path != "single":
            continue
        for dt in _dtypes_of(fp32):
            tag = f"shipped {dt} gated={int(gated)} BN={launch.bn} warps={launch.num_warps}"
            tag += f" stages={launch.num_stages}" if launch.num_stages else ""
            tag += " dw_apart" if launch.dw_apart and backward and gated else ""
            for fn, a, kconsts in _single_pass_kernels(dt, backward, gated, launch):
                name = fn.fn.__name__.strip("_")
                plain = {k: v for k, v in kconsts.items() if k != "HAS_BIAS"}
                yield (f"{name} {tag}", fn, a, plain, launch.num_warps, launch.num_stages)
                if "HAS_BIAS" in kconsts:
                    yield (f"{name} {tag} +bias", fn, a, kconsts, launch.num_warps, launch.num_stages)


def stage_variants():
    """``--stages``: every C = 64 direction's single-pass kernels, as the shipped table (or the
    heuristics, where the table routes the direction to another path) launches them, at
    pipelining depths 1, 2 and 3 (Triton's default on sm_90).  Triton 3.6, which the GPU runs,
    pipelines some of them into spills that depth 1 avoids (``Launch.num_stages``)."""
    for backward, gated, fp32 in sorted({k[1:] for k in sp.GPU_LAUNCH} | set(sp.PATH_AT_CP64)):
        launch = (sp.GPU_LAUNCH.get(("single", backward, gated, fp32))
                  or sp.heuristic_launch("single", backward, gated, fp32, 64))
        for dt in _dtypes_of(fp32):
            for fn, a, kconsts in _single_pass_kernels(dt, backward, gated, launch):
                bias = " +bias" if "HAS_BIAS" in kconsts else ""
                for stages in (1, 2, 3):
                    apart = " dw_apart" if kconsts.get("DW_APART") else ""
                    yield (f"{fn.fn.__name__.strip('_')} {dt} gated={int(gated)} BN={launch.bn} "
                           f"warps={launch.num_warps} stages={stages}{bias}{apart}", fn, a, kconsts, launch.num_warps,
                           stages)
            if backward and gated and not launch.dw_apart:  # the sweep's dW-apart candidates, 4 and 8 warps
                fn, a, kconsts = _single_pass_kernels(dt, True, True, launch._replace(dw_apart=True))[1]
                for warps in (4, 8):
                    for stages in (1, 2, 3):
                        yield (f"attention_bwd_kernel {dt} gated=1 BN={launch.bn} warps={warps} stages={stages} "
                               f"+bias dw_apart", fn, a, kconsts, warps, stages)


def each_kernel():
    """One bfloat16 variant of every kernel in every ``LAYOUT`` (``--each-kernel``): a quick check
    that all of them compile -- the interpreter accepts code the compiler rejects."""
    prec = "tf32"
    ptrs = _all_ptrs("bf16")
    single = dict(CP=32, BN=16, COMB=0, GATED=True, PREC=prec, W16=True)  # 16-bit weight dots, as launched
    kernels = [
        (sp._cell_qk_scores_kernel, single), (sp._attention_out_kernel, single),
        (sp._scores_grad_kernel, single), (sp._attention_bwd_kernel, dict(single, HAS_DH=True, HAS_DCN=False)),
        (sp._attention_bwd_kernel, dict(single, HAS_DH=True, HAS_DCN=True, DW_APART=True)),  # Launch.dw_apart
        (bk.qkv_rows_kernel, dict(BC=BLOCK_C, BN=32, COMB=0, GATED=True, WRITE_STATE=False, PREC=prec, W16=True)),
        (bk.proj_grad_rows_kernel, dict(BC=BLOCK_C, BN=32, COMB=0, PREC=prec, W16=True)),
        (bk.attention_bwd_rows_kernel, dict(BC=BLOCK_C, BN=32, COMB=0, GATED=True, PREC=prec, HAS_DH=False,
                                            HAS_DCN=True, W16=True)),
        (bk.abt_partials_kernel, dict(BC=BLOCK_C, BN=64, ROWSUM=True, PREC=prec)),
        (bk.mm_rows_kernel, dict(BC=BLOCK_C, BN=32, TRANS=True, PREC=prec)),
        # attention_matmul's launches: the projections read from memory (PROJ)
        (bk.qkv_rows_kernel, dict(BC=BLOCK_C, BN=32, COMB=1, GATED=True, WRITE_STATE=False, PREC=prec, PROJ=True)),
        (bk.proj_grad_rows_kernel, dict(BC=BLOCK_C, BN=32, COMB=1, PREC=prec, PROJ=True)),
        (bk.attention_bwd_rows_kernel, dict(BC=BLOCK_C, BN=32, COMB=1, GATED=True, PREC=prec, HAS_DH=True,
                                            HAS_DCN=True, PROJ=True)),
        (cl._cell_fwd_kernel, dict(BLOCK=1024)), (cl._cell_bwd_kernel, dict(BLOCK=1024, HAS_DH=True, HAS_DCN=False)),
        # the cell from a zero state (A rows i, o, g), as t = 0 launches it
        (cl._cell_fwd_kernel, dict(BLOCK=1024, GATES=3)),
        (cl._cell_bwd_kernel, dict(BLOCK=1024, HAS_DH=True, HAS_DCN=True, GATES=3)),
    ]
    for layout in cl.LAYOUTS.values():
        for fn, consts in kernels:
            has_bias = {"HAS_BIAS": True} if "HAS_BIAS" in fn.arg_names else {}  # the folded conv bias
            gates = " GATES=3" if consts.get("GATES") == 3 else ""
            gates += " PROJ" if consts.get("PROJ") else ""
            gates += " DW_APART" if consts.get("DW_APART") else ""
            yield (f"{fn.fn.__name__.strip('_')} bf16 LAYOUT={layout}{gates}", fn, ptrs,
                   {**consts, "LAYOUT": layout, **has_bias}, 4)
    # the projection dots on float32 operands (WEIGHT_DOTS_16BIT off, as float32 inputs run them)
    for fn, consts in kernels[:8]:
        apart = " DW_APART" if consts.get("DW_APART") else ""
        yield (f"{fn.fn.__name__.strip('_')} bf16 tf32 dots{apart}", fn, ptrs, {**consts, "W16": False, "LAYOUT": 0}, 4)
    # the single-pass path's reductions of its per-split partials (float32 in; sums cast to bf16 out)
    for cp, warps in ((64, 1), (256, 2)):  # single-pass widths; the blocked paths' (C = 256)
        rows = dict(CP=cp, RB=ap.ROWS_PER_PROGRAM)
        yield f"softmax_of_partials_kernel CP={cp}", ap._softmax_of_partials_kernel, {}, rows, warps
        yield f"scores_grad_of_partials_kernel CP={cp}", ap._scores_grad_of_partials_kernel, {}, rows, warps
    yield ("sum_three_kernel bf16 out", ap._sum_three_kernel, {f"o{k}_ptr": "bf16" for k in range(3)},
           dict(BLOCK=ap.SUM_BLOCK), 4)
    yield "cell_bwd_plane_kernel bf16 (NCHW)", cl._cell_bwd_plane_kernel, ptrs, dict(BLOCK=1024, HAS_DH=True,
                                                                                      HAS_DCN=False), 4
    yield "cell_bwd_pixels_kernel bf16 (NHWC)", cl._cell_bwd_pixels_kernel, ptrs, dict(BP=16, CP=64, HAS_DH=True,
                                                                                        HAS_DCN=False), 4
    yield "cell_bwd_plane_kernel bf16 GATES=3", cl._cell_bwd_plane_kernel, ptrs, dict(BLOCK=1024, HAS_DH=True,
                                                                                     HAS_DCN=True, GATES=3), 4
    yield "cell_bwd_pixels_kernel bf16 GATES=3", cl._cell_bwd_pixels_kernel, ptrs, dict(BP=16, CP=64, HAS_DH=True,
                                                                                       HAS_DCN=True, GATES=3), 4


def main() -> int:
    if FP32_PREC not in ("ieee", "tf32x3"):
        print(f"SM90_FP32_PREC must be ieee or tf32x3 (Launch.prec for float32), got {FP32_PREC!r}")
        return 2
    quick = "--each-kernel" in sys.argv[1:]
    stages = "--stages" in sys.argv[1:]
    bad = 0
    seen = set()
    print(f"triton {triton.__version__}, ptxas {os.path.basename(_PTXAS)}")
    print(f"{'variant':<58} {'smem B':>8} {'regs':>5} {'spill st/ld B':>14} {'blocks/SM':>9}")
    rows = (each_kernel() if quick else stage_variants() if stages else (*variants(), *shipped_single_pass()))
    for name, fn, ptrs, consts, warps, *depth in rows:
        if name in seen:
            continue
        seen.add(name)
        smem, regs, st, ld = _compile(fn, ptrs, consts, warps, *depth)
        flag = "" if smem <= SMEM_LIMIT and st == 0 else "  <-- over"
        bad += bool(flag)
        print(f"{name:<58} {smem:>8} {regs:>5} {st:>6}/{ld:<7} {blocks_per_sm(smem, regs, warps):>9}{flag}", flush=True)
    print(f"{len(seen)} variants, {bad} over the shared-memory limit or spilling")
    if quick or stages:
        return 0  # compiled, every one (an error raises); spills are the full table's business (--stages: a survey)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

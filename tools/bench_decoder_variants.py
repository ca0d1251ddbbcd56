"""Two ways to close the per-cell step's gap to the matmul floor, measured against the code as it is.

1. `block`: the recovery MLP's first block, Linear(h -> 2h) -> BatchNorm (batch statistics) -> ReLU, forward +
   backward at N = B * G rows, as torch computes it (native BatchNorm: 2 passes forward, 2 backward over the
   [N, 2h] tensor) and with the BatchNorm folded into the Linear from the moments of its input
   (mean_z = W mu + b, var_z = diag(W Cov(x) W^T): one h x h Gram matmul forward and one backward replace the
   BatchNorm passes; then out = ReLU(x (s W)^T + (s (b - mean_z) + beta))). Both are also compared with the
   same block in float64, to show each one's float32 error.
2. `compile`: one whole training step (tools/bench_model_ab.py's builder, per-cell path, random batches) with
   the recovery MLP under torch.compile (inductor, static shapes) against the plain step and the matmul floor,
   interleaved.

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184 .venv/bin/python tools/bench_decoder_variants.py block
    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184 .venv/bin/python tools/bench_decoder_variants.py compile
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from tools.bench_model import HIDDEN, SCALES


class _Moments(torch.autograd.Function):
    """(sum of rows, Gram matrix x^T x) with the backward dx = g1 + x (G + G^T): one matmul."""

    @staticmethod
    def forward(ctx, rows):
        ctx.save_for_backward(rows)
        return rows.sum(0), rows.t() @ rows

    @staticmethod
    def backward(ctx, g1, g2):
        (rows,) = ctx.saved_tensors
        return torch.addmm(g1.unsqueeze(0), rows, g2 + g2.t())


def block_native(x, lin, bn, bf16: bool):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return torch.relu_(bn(lin(x)))


def block_folded(x, lin, bn, bf16: bool):
    rows = x if x.dtype in (torch.float32, torch.float64) else x.float()
    s1, gram = _Moments.apply(rows)
    n = rows.shape[0]
    with torch.autocast("cpu", enabled=False):
        mu = s1.double() / n
        cov = gram.double() / n - torch.outer(mu, mu)
        w, b = lin.weight.double(), lin.bias.double()
        mean_z = w @ mu + b
        var_z = ((w @ cov) * w).sum(1)
        scale = bn.weight.double() * torch.rsqrt(var_z + bn.eps)
        w_f = (w * scale[:, None]).to(x.dtype)
        b_f = ((b - mean_z) * scale + bn.bias.double()).to(x.dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return torch.relu_(torch.nn.functional.linear(x, w_f, b_f))


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def run_block(args) -> None:
    rows = args.batch * SCALES[args.scale][0]
    h = HIDDEN
    torch.manual_seed(0)
    lin, bn = torch.nn.Linear(h, 2 * h), torch.nn.BatchNorm1d(2 * h)
    x0 = torch.relu(torch.randn(rows, h))
    grad = torch.randn(rows, 2 * h)

    def fwd_bwd(fn, dtype, bf16=False):
        lin.to(dtype), bn.to(dtype)
        x = x0.to(dtype, copy=True).requires_grad_()  # a fresh leaf each call (no grad accumulated across calls)
        out = fn(x, lin, bn, bf16)
        out.backward(grad.to(out.dtype))
        return out.detach().double(), x.grad.double()

    ref_out, ref_dx = fwd_bwd(block_native, torch.float64)
    print(f"block Linear({h}->{2 * h}) + BatchNorm + ReLU at N = {rows} rows ({args.scale}, B = {args.batch}); "
          f"{torch.get_num_threads()} threads; load {os.getloadavg()[0]:.1f}")
    for name, fn in (("native", block_native), ("folded", block_folded)):
        out, dx = fwd_bwd(fn, torch.float32)
        # Relative L2 errors (a max would be set by the few rows whose ReLU flips between float32 and float64).
        print(f"  {name} float32 vs float64: relative L2 error out {_rel(out, ref_out):.2e}, dx {_rel(dx, ref_dx):.2e}")
    for bf16 in (False, True):
        times = {"native": [], "folded": []}
        for i in range(args.warmup + args.steps):
            for name, fn in (("native", block_native), ("folded", block_folded)):
                t = time.perf_counter()
                fwd_bwd(fn, torch.float32, bf16)
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - t)
        n, f = statistics.median(times["native"]), statistics.median(times["folded"])
        print(f"  {'bf16 autocast' if bf16 else 'fp32'}: median s native {n:.4f}, folded {f:.4f} "
              f"(folded/native {f / n:.3f})")


def run_compile(args) -> None:
    from tools.bench_model_ab import build, matmul_floor

    total = args.warmup + args.steps
    for dtype in args.dtypes:
        plain, batches = build("gears_dist.model", args.scale, args.batch, dtype, total + 1, {})
        compiled, _ = build("gears_dist.model", args.scale, args.batch, dtype, total + 1, {})
        compiled.model.recovery = torch.compile(compiled.model.recovery, dynamic=False)
        floor = matmul_floor(args.batch * SCALES[args.scale][0], dtype)
        t = time.perf_counter()
        compiled(batches[0])
        compile_s = time.perf_counter() - t
        times = {"plain": [], "compiled": [], "floor": []}
        for i in range(1, total + 1):
            for name, fn, b in (("plain", plain, batches[i]), ("compiled", compiled, batches[i]),
                                ("floor", floor, None)):
                t = time.perf_counter()
                fn(b)
                if i > args.warmup:
                    times[name].append(time.perf_counter() - t)
        p, c, m = (statistics.median(times[k]) for k in ("plain", "compiled", "floor"))
        print(f"{dtype} {args.scale} B = {args.batch}, {torch.get_num_threads()} threads, load "
              f"{os.getloadavg()[0]:.1f}: compile + first step {compile_s:.1f} s; median s/step plain {p:.3f} "
              f"({p / m:.2f}x the floor), recovery compiled {c:.3f} ({c / m:.2f}x), floor {m:.3f}; "
              f"compiled/plain {c / p:.3f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["block", "compile"])
    parser.add_argument("--scale", default="norman", choices=sorted(SCALES))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    (run_block if args.what == "block" else run_compile)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

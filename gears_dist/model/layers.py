"""Building blocks of the GEARS model: multiplicity-weighted BatchNorm, MLP, normalized graph propagation.

BatchNorm here works on rows grouped as [R, U, C] with one weight per group u (the number of cells that share
the group's values). Its batch statistics are those of the expanded batch of sum(weight) * R rows, so a
layer applied once per distinct perturbation set gives exactly the numbers of the per-cell computation.
Statistics are accumulated in float32 also under bf16 autocast, and can be all-reduced across
torch.distributed ranks (differentiably, as SyncBatchNorm does).
"""

from __future__ import annotations

import itertools
import warnings

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F


def activation_dtype(device: torch.device, default: torch.dtype = torch.float32) -> torch.dtype:
    """The dtype matmul inputs get under the current autocast state (`default` without autocast)."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return default


def accumulate_dtype(t: Tensor) -> torch.dtype:
    """float64 for a float64 model (tests), else float32: statistics never accumulate in bf16/fp16."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# torch 2.13 marks the autograd-aware all_reduce used below deprecated, with a FutureWarning on every call (hundreds
# of log lines per run). Moving to torch.distributed._functional_collectives would need its own gradient tests
# (tests/test_model_distributed.py checks these gradients); until then, that one message is not shown.
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_reduce is deprecated",
                        category=FutureWarning)


def _all_reduce_sum(t: Tensor) -> Tensor:
    # Differentiable: the backward all-reduces the gradient, so every rank's loss sees every rank's rows.
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(t, op=dist.ReduceOp.SUM)


def _distributed_active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def group_sums(x: Tensor, group_weight: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Weighted row count, sum and sum of squares (float32) of x - pivot over all rows of x [R, U, C]
    (or [N, C], one group per row), and the pivot [C]. Row (r, u) counts group_weight[u] times; None means
    weight 1 each.
    """
    if x.dim() == 3 and FUSED_MOMENTS:
        acc = accumulate_dtype(x)
        w = torch.ones(x.shape[1], device=x.device, dtype=acc) if group_weight is None else group_weight.to(acc)
        with torch.autocast(x.device.type, enabled=False):
            s1, s2, pivot = _GroupMoments.apply(x, w)
        return w.sum() * x.shape[0], s1, s2, pivot
    if x.dim() == 2:
        x = x.unsqueeze(0)
    rows_per_group, num_groups, _ = x.shape
    acc = accumulate_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        # Moments about a pivot near the mean (mean of the first row block): no cancellation in
        # E[x^2] - E[x]^2.
        pivot = x[0].mean(0, dtype=acc).detach()
        centred = x - pivot.to(x.dtype)
        if group_weight is None:
            count = torch.full((), float(num_groups * rows_per_group), device=x.device, dtype=acc)
            s1 = centred.sum(dim=(0, 1), dtype=acc)
            s2 = (centred * centred).sum(dim=(0, 1), dtype=acc)
        else:
            w = group_weight.to(acc)
            count = w.sum() * rows_per_group
            s1 = w @ centred.sum(dim=0, dtype=acc)
            s2 = w @ (centred * centred).sum(dim=0, dtype=acc)
    return count, s1, s2, pivot


# group_sums of [R, U, C] tensors through _GroupMoments (one temporary forward, one or two passes backward) rather
# than autograd through centring, squaring and summing. A switch for benchmarks.
FUSED_MOMENTS = True


class _GroupMoments(torch.autograd.Function):
    """(s1, s2, pivot) of x [R, U, C] with row (r, u) counted w[u] times: s1 = sum w (x - pivot), s2 = sum w (x - pivot)^2
    (accumulated in w's dtype, float32 or float64), pivot [C] = the mean of the first row block (no gradient; the
    statistics built from s1, s2 do not depend on it).

    The same arithmetic as autograd through centring, squaring and summing, but the forward squares in place
    (one [R, U, C] temporary, nothing saved but x) and the backward is dx[r, u] = w[u] (g1 + 2 g2 (x[r, u] - pivot)):
    one pass for float32/float64 x, two for bf16/fp16 x (centred first, as the forward rounds it)."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor):
        acc = w.dtype
        pivot = x[0].mean(0, dtype=acc)
        centred = x - pivot.to(x.dtype)
        s1 = w @ centred.sum(dim=0, dtype=acc)
        s2 = w @ centred.mul_(centred).sum(dim=0, dtype=acc)
        ctx.save_for_backward(x, w, pivot)
        ctx.mark_non_differentiable(pivot)
        return s1, s2, pivot

    @staticmethod
    def backward(ctx, g1: Tensor | None, g2: Tensor | None, _g_pivot):
        x, w, pivot = ctx.saved_tensors
        if g1 is None:
            g1 = torch.zeros_like(pivot)
        if g2 is None:
            g2 = torch.zeros_like(pivot)
        wc = w.unsqueeze(1)
        if x.dtype == w.dtype:
            return torch.addcmul(wc * (g1 - 2.0 * g2 * pivot), x, wc * (2.0 * g2)), None
        # Low precision: w g1 + 2 w g2 x - 2 w g2 pivot would cancel in bf16; scale the centred values instead.
        centred = x - pivot.to(x.dtype)
        return torch.addcmul((wc * g1).to(x.dtype), centred, (wc * (2.0 * g2)).to(x.dtype)), None


def native_batch_norm_ok(group_weight: Tensor | None, sync: bool) -> bool:
    """Rows all of weight 1 and no cross-rank statistics: torch's fused BatchNorm kernels apply."""
    return group_weight is None and not (sync and _distributed_active())


class WeightedBatchNorm1d(nn.Module):
    """BatchNorm over channels with multiplicity-weighted rows; parameter and buffer names as nn.BatchNorm1d."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def statistics(self, count: Tensor, s1: Tensor, s2: Tensor, pivot: Tensor | None = None,
                   sync: bool = False) -> tuple[Tensor, Tensor]:
        """(mean, biased var) to normalize with: batch statistics in training (updating the running ones),
        running statistics in eval. count, s1, s2 are the row count, sum and sum of squares of x - pivot."""
        if not self.training:
            return self.running_mean, self.running_var
        if sync and _distributed_active():
            # Ranks have different pivots: move each rank's moments to pivot 0 (in float64, so that the
            # shift loses nothing) before summing.
            dtype = s1.dtype
            count, s1, s2 = count.double(), s1.double(), s2.double()
            if pivot is not None:
                pivot = pivot.double()
                s2 = s2 + 2.0 * pivot * s1 + count * pivot * pivot
                s1 = s1 + count * pivot
                pivot = None
            packed = _all_reduce_sum(torch.cat([count.reshape(1).to(s1.dtype), s1, s2]))
            count, s1, s2 = packed[0], packed[1 : 1 + self.num_features], packed[1 + self.num_features :]
            mean = s1 / count.clamp_min(1.0)
            var = (s2 / count.clamp_min(1.0) - mean * mean).clamp_min(0.0)
            mean, var = mean.to(dtype), var.to(dtype)
            self._update_running(count.to(dtype), mean.detach(), var.detach())
            return mean, var
        safe_count = count.clamp_min(1.0)
        centred_mean = s1 / safe_count
        var = (s2 / safe_count - centred_mean * centred_mean).clamp_min(0.0)
        mean = centred_mean if pivot is None else centred_mean + pivot
        self._update_running(count, mean.detach(), var.detach())
        return mean, var

    @torch.no_grad()
    def _update_running(self, count: Tensor, mean: Tensor, var: Tensor) -> None:
        # A batch with no rows (e.g. no perturbed cell for pert_fuse) leaves the running statistics alone,
        # decided on device: no host sync.
        has_rows = count > 0
        unbiased = var * (count / (count - 1.0).clamp_min(1.0))
        m = self.momentum
        mean, var = mean.to(self.running_mean.dtype), unbiased.to(self.running_var.dtype)
        self.running_mean.copy_(torch.where(has_rows, (1 - m) * self.running_mean + m * mean, self.running_mean))
        self.running_var.copy_(torch.where(has_rows, (1 - m) * self.running_var + m * var, self.running_var))
        self.num_batches_tracked.add_(has_rows.to(torch.long))

    def scale_shift(self, mean: Tensor, var: Tensor, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """BatchNorm as the affine map x * scale + shift ([C]), computed and returned in `dtype` when given,
        else in the parameters' dtype."""
        if dtype is not None:
            weight, bias, mean, var = self.weight.to(dtype), self.bias.to(dtype), mean.to(dtype), var.to(dtype)
        else:
            weight, bias = self.weight, self.bias
        scale = weight * torch.rsqrt(var + self.eps)
        shift = bias - mean * scale
        return scale.to(weight.dtype), shift.to(weight.dtype)

    def forward(self, x: Tensor, group_weight: Tensor | None = None, sync: bool = False,
                relu: bool = False) -> Tensor:
        """x: [R, U, C] with group_weight [U] (or [N, C] with [N]); None = every row once. relu: apply ReLU to
        the output in place (on the kernel's own output, before any reshaping view: an in-place op on a view
        makes autograd copy the whole tensor back through CopySlices/AsStrided in the backward)."""
        single_row = x.numel() == self.num_features  # torch refuses batch statistics of one row
        if not self.training or (native_batch_norm_ok(group_weight, sync) and not single_row):
            # torch's fused kernels: one pass for statistics, one for the output, fused backward.
            if self.training:
                self.num_batches_tracked.add_(1)
            out = F.batch_norm(x.reshape(-1, self.num_features), self.running_mean, self.running_var, self.weight,
                               self.bias, self.training, self.momentum, self.eps)
            return _maybe_relu_(out, relu).view(x.shape)
        if x.dim() == 3 and x.shape[1] == 1 and x.shape[0] > 1 and native_batch_norm_ok(None, sync):
            return self._one_group(x, group_weight, relu)
        if self.training:
            mean, var = self.statistics(*group_sums(x, group_weight), sync=sync)
        else:
            mean, var = self.running_mean, self.running_var
        scale, shift = self.scale_shift(mean, var)
        return _maybe_relu_(torch.addcmul(shift.to(x.dtype), x, scale.to(x.dtype)), relu)

    def _one_group(self, x: Tensor, group_weight: Tensor, relu: bool = False) -> Tensor:
        """One group of R rows, each counting w times (gene-level layers): the statistics are those of the R
        rows, so torch's fused kernel applies; only the running variance's unbiased correction uses w * R."""
        rows = x.reshape(-1, self.num_features)
        out, mean, invstd = torch.native_batch_norm(rows, self.weight, self.bias, None, None, True, 0.0, self.eps)
        with torch.no_grad():
            var = invstd.to(torch.float32).pow(-2) - self.eps
            self._update_running(group_weight.reshape(()).to(var.dtype) * rows.shape[0], mean.to(var.dtype), var)
        return _maybe_relu_(out, relu).view(x.shape)


def _maybe_relu_(x: Tensor, relu: bool) -> Tensor:
    return torch.relu_(x) if relu else x


class MLP(nn.Module):
    """Linear -> BatchNorm -> ReLU per layer, the last ReLU dropped (the GEARS MLP; ends in BatchNorm)."""

    def __init__(self, sizes: list[int], eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        if len(sizes) < 2:
            raise ValueError(f"an MLP needs at least input and output sizes, received {sizes}")
        self.sizes = list(sizes)
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(sizes))
        self.norms = nn.ModuleList(WeightedBatchNorm1d(b, eps, momentum) for b in sizes[1:])

    def forward(self, x: Tensor, group_weight: Tensor | None = None, sync: bool = False,
                last_norm: bool = True) -> Tensor:
        """x: [R, U, C] (or [N, C]); with last_norm=False the final BatchNorm is left to the caller."""
        num_layers = len(self.linears)
        for i, (linear, norm) in enumerate(zip(self.linears, self.norms)):
            x = linear(x)
            if i == num_layers - 1:
                return norm(x, group_weight, sync) if last_norm else x
            x = norm(x, group_weight, sync, relu=True)
        return x


def gcn_normalized_edges(edge_index: Tensor, edge_weight: Tensor | None, num_nodes: int
                         ) -> tuple[Tensor, Tensor, Tensor]:
    """Symmetric GCN normalization D^-1/2 (A + I) D^-1/2 of a weighted graph (PyG convention: row 0 = source j,
    row 1 = target i; messages flow j -> i; degrees are in-degrees at the target).

    Self-loops already in the graph keep their weight; nodes without one get weight 1 (as
    torch_geometric's add_remaining_self_loops). Returns (target, source, weight), sorted by target.
    """
    if edge_index.dim() != 2 or edge_index.shape[0] != 2:
        raise ValueError(f"edge_index must have shape [2, E], received {tuple(edge_index.shape)}")
    num_edges = edge_index.shape[1]
    if edge_weight is None:
        edge_weight = torch.ones(num_edges)
    if edge_weight.shape != (num_edges,):
        raise ValueError(f"edge_weight must have shape [{num_edges}] (one per edge), received {tuple(edge_weight.shape)}")
    edge_index = edge_index.to(torch.long).cpu()
    edge_weight = edge_weight.to(torch.float32).cpu()
    if num_edges and (int(edge_index.min()) < 0 or int(edge_index.max()) >= num_nodes):
        raise ValueError(f"edge_index holds node ids outside [0, {num_nodes}); expected ids of the {num_nodes} nodes")
    src, dst = edge_index[0], edge_index[1]
    is_loop = src == dst
    loop_weight = torch.ones(num_nodes)
    loop_weight[src[is_loop]] = edge_weight[is_loop]
    nodes = torch.arange(num_nodes)
    src = torch.cat([src[~is_loop], nodes])
    dst = torch.cat([dst[~is_loop], nodes])
    weight = torch.cat([edge_weight[~is_loop], loop_weight])
    degree = torch.zeros(num_nodes).index_add_(0, dst, weight)
    inv_sqrt = degree.pow(-0.5)
    inv_sqrt[torch.isinf(inv_sqrt)] = 0.0
    weight = inv_sqrt[src] * weight * inv_sqrt[dst]
    order = torch.argsort(dst * num_nodes + src)
    return dst[order], src[order], weight[order]


def _csr(target: Tensor, source: Tensor, weight: Tensor, num_rows: int) -> tuple[Tensor, Tensor, Tensor]:
    order = torch.argsort(target * (int(source.max()) + 1 if source.numel() else 1) + source)
    target, source, weight = target[order], source[order], weight[order]
    crow = torch.zeros(num_rows + 1, dtype=torch.long)
    crow[1:] = torch.cumsum(torch.bincount(target, minlength=num_rows), 0)
    return crow, source.to(torch.long).contiguous(), weight.to(torch.float32).contiguous()


def _sparse_mm(crow: Tensor, col: Tensor, val: Tensor, shape: tuple[int, int], x: Tensor) -> Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        matrix = torch.sparse_csr_tensor(crow, col, val.to(x.dtype), shape, check_invariants=False)
    return torch.sparse.mm(matrix, x)


class _Aggregate(torch.autograd.Function):
    """A @ x with the transpose precomputed for the backward; both run outside autocast (sparse kernels
    have no bf16 implementation on CPU, and the backward may be called inside an autocast region)."""

    @staticmethod
    def forward(ctx, x: Tensor, prop: Propagation) -> Tensor:
        ctx.prop = prop
        with torch.autocast(x.device.type, enabled=False):
            return _sparse_mm(prop.crow, prop.col, prop.val, prop.shape, x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        prop = ctx.prop
        with torch.autocast(grad.device.type, enabled=False):
            dtype = torch.float64 if grad.dtype == torch.float64 else torch.float32
            out = _sparse_mm(prop.crow_t, prop.col_t, prop.val_t, prop.shape[::-1], grad.to(dtype))
        return out, None


class Propagation(nn.Module):
    """Fixed sparse aggregation out[i] = sum_j A[i, j] x[j] (float32, CSR; cost E*C, not N*N).

    The CSR arrays are non-persistent dense buffers (broadcastable by DDP, not part of checkpoints: they
    are rebuilt from the graph)."""

    def __init__(self, target: Tensor, source: Tensor, weight: Tensor, num_rows: int, num_cols: int):
        super().__init__()
        self.shape = (num_rows, num_cols)
        for suffix, (rows, cols, n) in (("", (target, source, num_rows)), ("_t", (source, target, num_cols))):
            crow, col, val = _csr(rows, cols, weight, n)
            self.register_buffer("crow" + suffix, crow, persistent=False)
            self.register_buffer("col" + suffix, col, persistent=False)
            self.register_buffer("val" + suffix, val, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        # Back to the input's dtype: with bf16 parameters (DeepSpeed bf16) the next Linear expects bf16.
        return _Aggregate.apply(x.to(dtype), self).to(x.dtype)

"""The training step's cheaper code paths compute what the plain autograd formulation computes.

(Speed itself is measured by tools/bench_model_ab.py, not asserted here.)
"""

from __future__ import annotations

import torch

from gears_dist.model.gears import _GeneMap
from gears_dist.model.layers import MLP


def _backward_node_names(t: torch.Tensor) -> set[str]:
    seen, stack, names = set(), [t.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def test_gene_map_gradients_equal_autograd_through_bmm():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 5, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(7, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    grad = torch.randn(7, 5, dtype=torch.float64, generator=gen)
    ours = _GeneMap.apply(x, w)
    plain = torch.bmm(x, w.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(ours, plain, rtol=0, atol=0)
    dx, dw = torch.autograd.grad(ours, (x, w), grad)
    px, pw = torch.autograd.grad(plain, (x, w), grad)
    torch.testing.assert_close(dx, px, rtol=0, atol=0)
    torch.testing.assert_close(dw, pw, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(_GeneMap.apply, (x, w))


def test_gene_map_backward_on_a_transposed_gradient_copies_no_slices_per_gene():
    # The model hands _GeneMap the transpose of a [U, G] gradient; with that layout fp32 bmm falls back to one
    # select + clone per gene (5,045 per step at Norman size). Counted, not timed.
    from torch.profiler import ProfilerActivity, profile

    num_genes, num_sets, h = 300, 32, 16  # batch 32: the size at which the fallback shows
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(num_genes, num_sets, h, generator=gen, requires_grad=True)
    w = torch.randn(num_genes, h, generator=gen, requires_grad=True)
    grad = torch.randn(num_sets, num_genes, generator=gen).t()
    assert not grad.is_contiguous()
    out = _GeneMap.apply(x, w)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        dx, dw = torch.autograd.grad(out, (x, w), grad)
    clones = sum(e.count for e in prof.key_averages() if e.key in ("aten::clone", "aten::select"))
    assert clones < num_genes // 10, f"{clones} clone/select calls for {num_genes} genes"
    px, pw = torch.autograd.grad(torch.bmm(x, w.unsqueeze(-1)).squeeze(-1), (x, w), grad)
    torch.testing.assert_close(dx, px)
    torch.testing.assert_close(dw, pw)


def test_gene_map_with_bf16_inputs_matches_bmm():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, 8, generator=gen).bfloat16().requires_grad_()
    w = torch.randn(6, 8, generator=gen).bfloat16().requires_grad_()
    grad = torch.randn(6, 3, generator=gen).bfloat16()
    dx, dw = torch.autograd.grad(_GeneMap.apply(x, w), (x, w), grad)
    px, pw = torch.autograd.grad(torch.bmm(x, w.unsqueeze(-1)).squeeze(-1), (x, w), grad)
    assert dx.dtype == dw.dtype == torch.bfloat16
    torch.testing.assert_close(dx, px, rtol=0, atol=0)
    torch.testing.assert_close(dw.float(), pw.float(), rtol=2e-2, atol=2e-2)


def test_mlp_relu_runs_in_place_on_the_kernel_output_not_on_a_view():
    # An in-place ReLU on a reshaping view of the BatchNorm output makes autograd copy the whole [R, U, C]
    # tensor back in the backward (CopySlices / AsStridedBackward); the MLP must not build such nodes,
    # and must give the same values and gradients as out-of-place ReLU.
    gen = torch.Generator().manual_seed(2)
    mlp = MLP([4, 6, 3]).train()
    x = torch.randn(5, 7, 4, generator=gen, requires_grad=True)
    out = mlp(x)
    assert not {"CopySlices", "AsStridedBackward0"} & _backward_node_names(out)
    grad = torch.randn(out.shape, generator=gen)
    ours = torch.autograd.grad(out, (x, *mlp.parameters()), grad)

    def plain(x):
        h = torch.nn.functional.linear(x, mlp.linears[0].weight, mlp.linears[0].bias).reshape(-1, 6)
        h = torch.relu(torch.nn.functional.batch_norm(h, None, None, mlp.norms[0].weight, mlp.norms[0].bias, True))
        h = torch.nn.functional.linear(h, mlp.linears[1].weight, mlp.linears[1].bias)
        return torch.nn.functional.batch_norm(h, None, None, mlp.norms[1].weight, mlp.norms[1].bias, True).view(5, 7, 3)

    ref = plain(x)
    torch.testing.assert_close(out, ref)
    for a, b in zip(ours, torch.autograd.grad(ref, (x, *mlp.parameters()), grad)):
        torch.testing.assert_close(a, b)


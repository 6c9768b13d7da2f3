"""torch.compile of the search supernet: no graph breaks per cell, the same loss and gradients as eager."""
import pytest
import torch

import fastnas
from fastnas import runtime


def _tiny_net():
    torch.manual_seed(0)
    net = fastnas.SuperNet(4, 1, 3, primitives=["none", "skip_connect", "sep_conv_3x3", "max_pool_3x3",
                                                "channel_attention", "spatial_attention"],
                           steps=2, multiplier=2, in_channels=1)
    with torch.no_grad():
        for a in net.arch_parameters():
            a.normal_(0, 0.5)
    return net


def _loss_and_grads(net, x, y):
    net.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(net(x), y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend", ["cpu"] if fastnas.ops.available_backends()["cpu"] == "available"
                         else ["reference"])
def test_cells_compile_fullgraph_and_match_eager(backend):
    torch._dynamo.reset()
    x, y = torch.randn(2, 1, 8, 8), torch.randint(0, 3, (2,))
    with fastnas.ops.backend(backend):
        eager = _loss_and_grads(_tiny_net(), x, y)
        net = _tiny_net()
        for cell in net.cells:
            cell.compile(fullgraph=True)  # a graph break would raise here
        compiled = _loss_and_grads(net, x, y)
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-6)
    assert compiled[1].keys() == eager[1].keys()
    for name in eager[1]:
        torch.testing.assert_close(compiled[1][name], eager[1][name], rtol=1e-4, atol=1e-6,
                                   msg=lambda m: f"{name}: {m}")


def test_compile_failure_falls_back_to_eager(caplog):
    class Breaks(torch.nn.Module):
        def forward(self, x):
            return x + 1

    wrapped = runtime.CompiledOrEager(Breaks())

    def fail(*args):
        raise RuntimeError("backend compiler failed")

    wrapped.compiled = fail
    fastnas.runtime.log.propagate = True
    try:
        with caplog.at_level("WARNING", logger="fastnas"):
            out = wrapped(torch.zeros(2))
            out2 = wrapped(torch.zeros(2))
    finally:
        fastnas.runtime.log.propagate = False
    assert torch.equal(out, torch.ones(2)) and torch.equal(out2, torch.ones(2))
    assert sum("continuing eagerly" in r.message for r in caplog.records) == 1

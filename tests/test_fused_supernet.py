"""The supernet on every backend: same answer as the reference, in every mode combination that makes sense."""
from __future__ import annotations

import pytest
import torch

import fastnas
from fastnas.nn.plans import Execution
from fastnas.search import Search
from helpers import saved_bytes, tiny_search_config

FUSED = [b for b in ("cpu", "triton") if fastnas.ops.available_backends()[b] == "available"]


def _net(partial_channels=1, seed=0, memory_efficient=True):
    """Built for channels_last on the CPU (the fused-norms plan where its kernels run; NCHW inputs then take the
    op's own reference path)."""
    torch.manual_seed(seed)
    net = fastnas.SuperNet(8, 3, 10, primitives="at-darts", in_channels=1, partial_channels=partial_channels,
                           memory_efficient=memory_efficient, execution=Execution(channels_last=True))
    with torch.no_grad():
        for a in net.arch_parameters():
            a.normal_(0, 0.3)
    return net


def _loss_and_grads(net, x, y, backend, channels_last=False, amp=None):
    net.zero_grad(set_to_none=True)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with fastnas.ops.backend(backend), torch.autocast("cpu", dtype=amp, enabled=amp is not None):
        logits = net(x)
        loss = torch.nn.functional.cross_entropy(logits.float(), y)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in net.named_parameters() if p.grad is not None}
    return logits.detach().float(), loss.detach(), grads


# the Triton interpreter takes ~10 s per supernet step here: two of the four combinations for it
AGREE = [(b, pc, cl) for b in FUSED for pc in (1, 4) for cl in (False, True) if b != "triton" or pc == 4 - 3 * cl]


@pytest.mark.parametrize("backend,partial_channels,channels_last", AGREE)
def test_backends_agree_with_reference(backend, partial_channels, channels_last):
    """Logits, loss and the gradients of every weight and architecture parameter agree within fp32 tolerance."""
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    net = _net(partial_channels)
    ref = _loss_and_grads(net, x, y, "reference", channels_last)
    got = _loss_and_grads(net, x, y, backend, channels_last)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-6)
    assert got[2].keys() == ref[2].keys()
    for name in ref[2]:
        torch.testing.assert_close(got[2][name], ref[2][name], rtol=1e-3, atol=1e-5, msg=lambda m: f"{name}: {m}")
    assert {"alphas_normal", "alphas_reduce"} <= ref[2].keys()


@pytest.mark.parametrize("backend", FUSED)
def test_bf16_autocast_as_accurate_as_reference(backend):
    """Under bf16 autocast every backend rounds differently; each must be about as close to the fp32 result as the
    reference backend is."""
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    net = _net()
    truth = _loss_and_grads(net, x, y, "reference")
    ref = _loss_and_grads(net, x, y, "reference", amp=torch.bfloat16)
    got = _loss_and_grads(net, x, y, backend, amp=torch.bfloat16)
    err = lambda r, name: (r[2][name] - truth[2][name]).abs().max().item()  # noqa: E731
    assert abs(got[1] - truth[1]) <= 2 * abs(ref[1] - truth[1]) + 1e-2
    for name in ("alphas_normal", "alphas_reduce", "classifier.weight"):
        assert err(got, name) <= 2 * err(ref, name) + 1e-3, (name, err(got, name), err(ref, name))


def test_partial_channels_weight_count_matches_pc_darts():
    """PC-DARTS (K=4, C=16, 8 cells, DARTS space) logs 'param size = 0.299578MB'."""
    net = fastnas.SuperNet(16, 8, 10, primitives="darts", partial_channels=4)
    assert sum(p.numel() for p in net.weight_parameters()) == 299_578
    assert len(net.arch_parameters()) == 4


def test_partial_channels_rank_edges_with_edge_weights():
    net = _net(partial_channels=4)
    with torch.no_grad():
        net.alphas_normal.zero_()
        net.alphas_normal[:, 4] = 1.0  # sep_conv_3x3 everywhere, equally strong
        net.betas_normal.zero_()
        net.betas_normal[1] = -5.0     # node 0: edge from c_{k-1} is weak
    assert net.genotype().normal[:2] == [("sep_conv_3x3", 0), ("sep_conv_3x3", 1)]
    with torch.no_grad():
        net.betas_normal[1] = 5.0
        net.betas_normal[0] = -5.0
    assert net.genotype().normal[0] == ("sep_conv_3x3", 1)


MODES = [
    dict(order=1), dict(order=2), dict(order=1, amp="bf16"), dict(order=2, amp="bf16"), dict(order=1, amp="fp16"),
    dict(order=1, channels_last=True), dict(order=2, channels_last=True), dict(order=1, partial_channels=2),
    dict(order=2, partial_channels=2), dict(order=1, partial_channels=2, amp="bf16", channels_last=True),
]


@pytest.mark.parametrize("backend", ["reference"] + FUSED[:1])
@pytest.mark.parametrize("mode", MODES, ids=lambda m: "-".join(f"{k}={v}" for k, v in m.items()))
def test_search_step_in_every_mode(backend, mode):
    s = Search(tiny_search_config(C=8, epochs=1, max_steps=1, backend=backend, **mode), progress=False)
    before = [a.detach().clone() for a in s.model.arch_parameters()]
    s.run()
    after = s.model.arch_parameters()
    assert all(torch.isfinite(a).all() for a in after)
    if mode.get("amp") != "fp16":  # fp16's first steps may be skipped while the loss scale settles
        assert any(not torch.equal(a, b) for a, b in zip(before, after))


def test_refused_combinations():
    with pytest.raises(fastnas.ConfigError, match="fp16"):
        Search(tiny_search_config(order=2, amp="fp16"), progress=False)
    with pytest.raises(fastnas.ConfigError, match="partial"):
        Search(tiny_search_config(C=6, partial_channels=4), progress=False)


@pytest.mark.parametrize("backend", ["reference"] + FUSED[:1])
def test_memory_plan_same_arithmetic_less_saved(backend):
    """Recomputing the parameter-free candidates and sharing relu(state) changes nothing but what is stored:
    the same loss, gradients and batch-norm statistics (updated once, not again by the recomputation)."""
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    plain, lean = _net(memory_efficient=False), _net()
    a = _loss_and_grads(plain, x, y, backend)
    b = _loss_and_grads(lean, x, y, backend)
    torch.testing.assert_close(b[1], a[1])
    for name in a[2]:
        torch.testing.assert_close(b[2][name], a[2][name], rtol=1e-5, atol=1e-6)
    for (name, u), v in zip(plain.named_buffers(), lean.buffers()):
        torch.testing.assert_close(v, u, msg=lambda m: f"{name}: {m}")
    with fastnas.ops.backend(backend):
        assert saved_bytes(lean, x) < 0.8 * saved_bytes(plain, x)

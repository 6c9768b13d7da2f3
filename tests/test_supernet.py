import pytest
import torch

import fastnas
from fastnas.errors import ConfigError
from fastnas.supernet import reduction_layers


def test_weight_count_matches_original_darts():
    """The original DARTS search network (C=16, 8 cells, CIFAR-10) logs 'param size = 1.930618MB'."""
    net = fastnas.SuperNet(16, 8, 10, primitives="darts")
    assert sum(p.numel() for p in net.weight_parameters()) == 1_930_618


def test_arch_parameters_are_parameters_kept_apart():
    net = fastnas.SuperNet(4, 3, 10, in_channels=1)
    arch = net.arch_parameters()
    assert all(isinstance(a, torch.nn.Parameter) for a in arch)
    assert [tuple(a.shape) for a in arch] == [(14, 10), (14, 10)]
    assert not {id(p) for p in arch} & {id(p) for p in net.weight_parameters()}
    assert len(arch) + len(net.weight_parameters()) == len(list(net.parameters()))
    state = net.state_dict()
    assert "alphas_normal" in state and "alphas_reduce" in state
    assert arch[0].abs().max() < 0.01  # 1e-3 * randn


@pytest.mark.parametrize("layers", [1, 2, 3, 5, 8])
def test_shapes_and_reductions(layers):
    net = fastnas.SuperNet(4, layers, 7, steps=3, multiplier=2, in_channels=3)
    reductions = reduction_layers(layers)
    assert [i for i, c in enumerate(net.cells) if c.reduction] == reductions
    assert net(torch.randn(2, 3, 8, 8)).shape == (2, 7)


def test_too_small_input_is_refused():
    net = fastnas.SuperNet(4, 3, 10, in_channels=1)
    with pytest.raises(ConfigError, match="too small"):
        net(torch.randn(1, 1, 3, 3))
    with pytest.raises(ConfigError, match=r"\[N, 1, H, W\]"):
        net(torch.randn(1, 3, 8, 8))


def test_none_is_skipped_and_skip_connect_is_not_copied():
    net = fastnas.SuperNet(4, 3, 10, in_channels=1)
    cell = net.cells[0]
    assert 0 not in cell.active and len(cell.edges[0]) == 9
    skip = cell.edges[0][cell.active.index(3)]  # skip_connect at stride 1 is the identity
    x = torch.randn(1, 4, 4, 4)
    assert skip(x) is x


def test_node_fusion_equals_darts_edge_sum():
    """Each node's fused mixed_sum equals DARTS's Σ_edges Σ_ops w · op(h), with 'none' contributing zero."""
    torch.manual_seed(0)
    net = fastnas.SuperNet(4, 3, 10, in_channels=1).eval()
    cell = net.cells[1]
    s0, s1 = torch.randn(2, 12, 8, 8), torch.randn(2, 16, 8, 8)  # cell 1 is a reduction cell here
    w = torch.softmax(torch.randn(14, 10), -1)
    out = cell(s0, s1, w)
    states = [cell.preprocess0(s0), cell.preprocess1(s1)]
    offset = 0
    for _ in range(cell.steps):
        node = 0
        for j, h in enumerate(states):
            for k, op in zip(cell.active, cell.edges[offset + j]):
                node = node + w[offset + j, k] * op(h)
        offset += len(states)
        states.append(node)
    torch.testing.assert_close(out, torch.cat(states[-4:], 1))


def test_bad_construction():
    with pytest.raises(ConfigError, match="even"):
        fastnas.SuperNet(5, 3, 10)
    with pytest.raises(ConfigError, match="multiplier"):
        fastnas.SuperNet(4, 3, 10, steps=2, multiplier=3)

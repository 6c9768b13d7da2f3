import pytest
import torch
from torch import nn

import fastnas
from fastnas.errors import ConfigError
from fastnas.nn import CBAM, ChannelAttention, SpatialAttention
from fastnas.space import SPACES, make_op, register_op, resolve_primitives


def test_named_spaces():
    assert len(SPACES["darts"]) == 8 and SPACES["darts"][0] == "none"
    assert SPACES["at-darts"] == SPACES["darts"] + ("channel_attention", "spatial_attention")
    assert resolve_primitives("at-darts") == SPACES["at-darts"]
    assert resolve_primitives("none,skip_connect") == ("none", "skip_connect")
    assert resolve_primitives(["channel_attention"]) == ("channel_attention",)


@pytest.mark.parametrize("spec,match", [
    ("nas-bench", "unknown search space"),
    (["sep_conv_3x3", "conv_9x9"], "conv_9x9"),
    (["none"], "besides 'none'"),
    (["skip_connect", "skip_connect"], "duplicate"),
])
def test_bad_spaces_are_refused(spec, match):
    with pytest.raises(ConfigError, match=match):
        resolve_primitives(spec)


@pytest.mark.parametrize("name", SPACES["at-darts"] + ("sep_conv_7x7", "conv_7x1_1x7"))
@pytest.mark.parametrize("stride", [1, 2])
def test_every_op_keeps_channels_and_applies_stride(name, stride):
    op = make_op(name, 6, stride, affine=False)
    x = torch.randn(2, 6, 7, 7)  # odd size: the factorized reduction must cope
    y = op(x)
    assert y.shape == (2, 6, 4 if stride == 2 else 7, 4 if stride == 2 else 7)


def test_register_new_op_without_editing_the_package():
    class Double(nn.Module):
        def forward(self, x):
            return 2 * x

    register_op("double_test_op", lambda C, stride, affine: Double() if stride == 1 else nn.AvgPool2d(2))
    net = fastnas.SuperNet(4, 3, 5, primitives=["none", "double_test_op", "skip_connect"], in_channels=1)
    assert net(torch.randn(2, 1, 8, 8)).shape == (2, 5)
    with pytest.raises(ConfigError, match="already registered"):
        register_op("double_test_op", lambda C, s, a: Double())


def test_attention_modules_match_cbam_definition():
    torch.manual_seed(0)
    x = torch.randn(3, 32, 5, 6)
    ca = ChannelAttention(32, reduction=16)
    assert ca.mlp[0].out_features == 2  # C // r
    mlp = ca.mlp
    expected = x * torch.sigmoid(mlp(x.mean((2, 3))) + mlp(x.amax((2, 3))))[:, :, None, None]
    torch.testing.assert_close(ca(x), expected)
    assert ChannelAttention(8, 16).mlp[0].out_features == 1  # max(1, C // r)

    sa = SpatialAttention(7).eval()
    pooled = torch.cat([x.amax(1, keepdim=True), x.mean(1, keepdim=True)], 1)
    torch.testing.assert_close(sa(x), x * torch.sigmoid(sa.bn(sa.conv(pooled))))
    assert CBAM(32)(x).shape == x.shape


def test_modules_compute_through_the_selected_backend():
    """A backend swap reaches every attention gate: the gates call fastnas.ops, not torch directly."""
    from fastnas.ops import reference
    from fastnas.ops.backend import define_kernels, register_backend, required_kernels

    calls: list[str] = []

    def spy(name):
        kernel = reference.KERNELS[name]
        return lambda *args: calls.append(name) or kernel(*args)

    register_backend("spy", define_kernels("fastnas_spy", {n: spy(n) for n in sorted(required_kernels())}), ("cpu",))
    x = torch.randn(1, 8, 3, 3)
    with fastnas.ops.backend("spy"):
        ChannelAttention(8)(x)
        assert "channel_pool" in calls and "channel_scale" in calls
        calls.clear()
        SpatialAttention(3)(x)
        assert "spatial_pool" in calls and "spatial_scale" in calls

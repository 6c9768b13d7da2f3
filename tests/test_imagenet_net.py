"""The ImageNet evaluation network against a faithful copy of DARTS's NetworkImageNet (Liu et al., 2018,
cnn/model.py and cnn/operations.py): the same parameter count for DARTS_V2 at DARTS's ImageNet setting, and the same
outputs in float64 with the same weights. Also the choice of network by image size and its errors."""
import pytest
import torch
from torch import nn

import fastnas
from fastnas.config import TRAIN_PRESETS, TrainConfig
from fastnas.errors import ConfigError
from fastnas.evalnet import EvalNet, build_from_config, imagenet_auxiliary_geometry, resolve_network
from fastnas.genotypes import DARTS_V2


# -- DARTS's code, as published (Python 3: range for xrange; the constructor's print left out) ----------------------
class Identity(nn.Module):
    def forward(self, x):
        return x


class Zero(nn.Module):
    def __init__(self, stride):
        super().__init__()
        self.stride = stride

    def forward(self, x):
        if self.stride == 1:
            return x.mul(0.)
        return x[:, :, ::self.stride, ::self.stride].mul(0.)


class ReLUConvBN(nn.Module):
    def __init__(self, C_in, C_out, kernel_size, stride, padding, affine=True):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_out, kernel_size, stride=stride, padding=padding, bias=False),
            nn.BatchNorm2d(C_out, affine=affine))

    def forward(self, x):
        return self.op(x)


class DilConv(nn.Module):
    def __init__(self, C_in, C_out, kernel_size, stride, padding, dilation, affine=True):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_in, kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation,
                      groups=C_in, bias=False),
            nn.Conv2d(C_in, C_out, kernel_size=1, padding=0, bias=False),
            nn.BatchNorm2d(C_out, affine=affine))

    def forward(self, x):
        return self.op(x)


class SepConv(nn.Module):
    def __init__(self, C_in, C_out, kernel_size, stride, padding, affine=True):
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_in, kernel_size=kernel_size, stride=stride, padding=padding, groups=C_in, bias=False),
            nn.Conv2d(C_in, C_in, kernel_size=1, padding=0, bias=False),
            nn.BatchNorm2d(C_in, affine=affine),
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_in, kernel_size=kernel_size, stride=1, padding=padding, groups=C_in, bias=False),
            nn.Conv2d(C_in, C_out, kernel_size=1, padding=0, bias=False),
            nn.BatchNorm2d(C_out, affine=affine))

    def forward(self, x):
        return self.op(x)


class FactorizedReduce(nn.Module):
    def __init__(self, C_in, C_out, affine=True):
        super().__init__()
        assert C_out % 2 == 0
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, padding=0, bias=False)
        self.conv_2 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, padding=0, bias=False)
        self.bn = nn.BatchNorm2d(C_out, affine=affine)

    def forward(self, x):
        x = self.relu(x)
        out = torch.cat([self.conv_1(x), self.conv_2(x[:, :, 1:, 1:])], dim=1)
        return self.bn(out)


OPS = {
    'none': lambda C, stride, affine: Zero(stride),
    'avg_pool_3x3': lambda C, stride, affine: nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False),
    'max_pool_3x3': lambda C, stride, affine: nn.MaxPool2d(3, stride=stride, padding=1),
    'skip_connect': lambda C, stride, affine: Identity() if stride == 1 else FactorizedReduce(C, C, affine=affine),
    'sep_conv_3x3': lambda C, stride, affine: SepConv(C, C, 3, stride, 1, affine=affine),
    'sep_conv_5x5': lambda C, stride, affine: SepConv(C, C, 5, stride, 2, affine=affine),
    'sep_conv_7x7': lambda C, stride, affine: SepConv(C, C, 7, stride, 3, affine=affine),
    'dil_conv_3x3': lambda C, stride, affine: DilConv(C, C, 3, stride, 2, 2, affine=affine),
    'dil_conv_5x5': lambda C, stride, affine: DilConv(C, C, 5, stride, 4, 2, affine=affine),
}


class Cell(nn.Module):
    def __init__(self, genotype, C_prev_prev, C_prev, C, reduction, reduction_prev):
        super().__init__()
        if reduction_prev:
            self.preprocess0 = FactorizedReduce(C_prev_prev, C)
        else:
            self.preprocess0 = ReLUConvBN(C_prev_prev, C, 1, 1, 0)
        self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0)
        if reduction:
            op_names, indices = zip(*genotype.reduce)
            concat = genotype.reduce_concat
        else:
            op_names, indices = zip(*genotype.normal)
            concat = genotype.normal_concat
        self._compile(C, op_names, indices, concat, reduction)

    def _compile(self, C, op_names, indices, concat, reduction):
        assert len(op_names) == len(indices)
        self._steps = len(op_names) // 2
        self._concat = concat
        self.multiplier = len(concat)
        self._ops = nn.ModuleList()
        for name, index in zip(op_names, indices):
            stride = 2 if reduction and index < 2 else 1
            op = OPS[name](C, stride, True)
            self._ops += [op]
        self._indices = indices

    def forward(self, s0, s1, drop_prob):
        s0 = self.preprocess0(s0)
        s1 = self.preprocess1(s1)
        states = [s0, s1]
        for i in range(self._steps):
            h1 = states[self._indices[2 * i]]
            h2 = states[self._indices[2 * i + 1]]
            h1 = self._ops[2 * i](h1)
            h2 = self._ops[2 * i + 1](h2)
            assert not (self.training and drop_prob > 0.)  # drop path is off in these tests
            states += [h1 + h2]
        return torch.cat([states[i] for i in self._concat], dim=1)


class AuxiliaryHeadImageNet(nn.Module):
    def __init__(self, C, num_classes):
        """assuming input size 14x14"""
        super().__init__()
        self.features = nn.Sequential(
            nn.ReLU(inplace=True),
            nn.AvgPool2d(5, stride=2, padding=0, count_include_pad=False),
            nn.Conv2d(C, 128, 1, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(inplace=True),
            nn.Conv2d(128, 768, 2, bias=False),
            # NOTE: This batchnorm was omitted in my earlier implementation due to a typo.
            # Commenting it out for consistency with the experiments in the paper.
            # nn.BatchNorm2d(768),
            nn.ReLU(inplace=True))
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x):
        x = self.features(x)
        return self.classifier(x.view(x.size(0), -1))


class NetworkImageNet(nn.Module):
    def __init__(self, C, num_classes, layers, auxiliary, genotype):
        super().__init__()
        self._layers = layers
        self._auxiliary = auxiliary
        self.stem0 = nn.Sequential(
            nn.Conv2d(3, C // 2, kernel_size=3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(C // 2),
            nn.ReLU(inplace=True),
            nn.Conv2d(C // 2, C, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(C))
        self.stem1 = nn.Sequential(
            nn.ReLU(inplace=True),
            nn.Conv2d(C, C, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(C))
        C_prev_prev, C_prev, C_curr = C, C, C
        self.cells = nn.ModuleList()
        reduction_prev = True
        for i in range(layers):
            if i in [layers // 3, 2 * layers // 3]:
                C_curr *= 2
                reduction = True
            else:
                reduction = False
            cell = Cell(genotype, C_prev_prev, C_prev, C_curr, reduction, reduction_prev)
            reduction_prev = reduction
            self.cells += [cell]
            C_prev_prev, C_prev = C_prev, cell.multiplier * C_curr
            if i == 2 * layers // 3:
                C_to_auxiliary = C_prev
        if auxiliary:
            self.auxiliary_head = AuxiliaryHeadImageNet(C_to_auxiliary, num_classes)
        self.global_pooling = nn.AvgPool2d(7)
        self.classifier = nn.Linear(C_prev, num_classes)

    def forward(self, input):
        logits_aux = None
        s0 = self.stem0(input)
        s1 = self.stem1(s0)
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, self.drop_path_prob)
            if i == 2 * self._layers // 3:
                if self._auxiliary and self.training:
                    logits_aux = self.auxiliary_head(s1)
        out = self.global_pooling(s1)
        logits = self.classifier(out.view(out.size(0), -1))
        return logits, logits_aux


# -- tests -------------------------------------------------------------------------------------------------------
def _count(module, auxiliary=True):
    return sum(p.numel() for n, p in module.named_parameters() if auxiliary or "auxiliary" not in n)


def test_parameter_count_matches_original_darts_imagenet():
    """DARTS_V2 at DARTS's ImageNet setting (C=48, 14 cells, 1000 classes, auxiliary head on)."""
    original = NetworkImageNet(48, 1000, 14, True, DARTS_V2)
    ours = EvalNet(DARTS_V2, 48, 14, 1000, auxiliary=True, input_size=224, network="imagenet")
    assert ours.param_count(auxiliary=True) == _count(original) == 5_979_528
    assert ours.param_count() == _count(original, auxiliary=False) == 4_718_752  # DARTS's "4.7M"
    assert ours.network == "imagenet" and ours.aux_index == 9
    assert EvalNet(DARTS_V2, 48, 14, 1000, auxiliary=True, input_size=224).network == "imagenet"  # auto


def _copy_weights(original: nn.Module, ours: nn.Module) -> None:
    """Both register their tensors in the same order: copy them across by position, checking every shape."""
    src, dst = list(original.state_dict().values()), ours.state_dict()
    assert len(src) == len(dst)
    for (name, d), s in zip(dst.items(), src):
        assert d.shape == s.shape, name
        d.copy_(s)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_outputs_equal_original_in_float64(backend):
    """A tiny configuration (C=8, 5 cells) at 224x224, where DARTS's 7x7 average pooling and its auxiliary head fit:
    the same logits in eval mode, and the same logits and auxiliary logits in training mode (batch statistics)."""
    torch.manual_seed(0)
    original = NetworkImageNet(8, 5, 5, True, DARTS_V2).double()
    original.drop_path_prob = 0.0
    for m in original.modules():  # non-trivial batch-norm statistics and affine parameters
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.running_mean, -0.5, 0.5)
            nn.init.uniform_(m.running_var, 0.5, 1.5)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    ours = EvalNet(DARTS_V2, 8, 5, 5, auxiliary=True, input_size=224, network="imagenet").double()
    _copy_weights(original, ours)
    x = torch.randn(2, 3, 224, 224, dtype=torch.float64)
    with fastnas.ops.backend(backend), torch.no_grad():
        expected, _ = original.eval()(x)
        torch.testing.assert_close(ours.eval()(x), expected, rtol=1e-10, atol=1e-10)
        expected, expected_aux = original.train()(x)
        logits, aux = ours.train()(x)
    torch.testing.assert_close(logits, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(aux, expected_aux, rtol=1e-10, atol=1e-10)


def test_auto_picks_by_image_size_and_keeps_small_images_on_cifar():
    assert resolve_network("auto", 8) == resolve_network("auto", 32) == resolve_network("auto", 63) == "cifar"
    assert resolve_network("auto", 64) == resolve_network("auto", 224) == "imagenet"
    digits = EvalNet(DARTS_V2, 4, 3, 10, in_channels=1, input_size=8)
    assert digits.network == "cifar" and hasattr(digits, "stem") and not hasattr(digits, "stem0")
    assert EvalNet(DARTS_V2, 36, 20, 10).param_count() == 3_349_342  # CIFAR-10 default unchanged
    net = EvalNet(DARTS_V2, 4, 3, 7, auxiliary=True, in_channels=1, input_size=64)  # odd sizes after the stem
    assert net.network == "imagenet"
    logits, aux = net.train()(torch.randn(2, 1, 64, 64))
    assert logits.shape == aux.shape == (2, 7)
    assert net.eval()(torch.randn(3, 1, 72, 72)).shape == (3, 7)
    assert imagenet_auxiliary_geometry(7) == (5, 2, 2)  # DARTS's head at 224x224
    rebuilt = build_from_config(net.arch_config())
    assert rebuilt.network == "imagenet" and rebuilt.param_count(True) == net.param_count(True)
    old = digits.arch_config()
    del old["network"]  # saved before the ImageNet network existed
    assert build_from_config(old).network == "cifar"


def test_imagenet_network_refuses_what_it_cannot_take():
    with pytest.raises(ConfigError, match=r"too small for the ImageNet network: its stem reduces the image by 8.*"
                                          r"at least 32x32"):
        EvalNet(DARTS_V2, 4, 3, 10, input_size=16, network="imagenet")
    with pytest.raises(ConfigError, match="network must be one of auto, cifar, imagenet"):
        EvalNet(DARTS_V2, 4, 3, 10, network="resnet")


def test_imagenet_preset_has_darts_imagenet_hyperparameters():
    p = TRAIN_PRESETS["imagenet"]
    assert (p["network"], p["C"], p["layers"], p["epochs"], p["batch_size"], p["lr"], p["momentum"],
            p["weight_decay"], p["lr_schedule"], p["lr_gamma"], p["lr_step"], p["label_smoothing"],
            p["auxiliary"], p["auxiliary_weight"], p["grad_clip"], p["drop_path_prob"]) == (
        "imagenet", 48, 14, 250, 128, 0.1, 0.9, 3e-5, "step", 0.97, 1, 0.1, True, 0.4, 5.0, 0.0)
    TrainConfig(**p).validate()


@pytest.mark.parametrize("field,value,match", [
    ("network", "resnet", "--network must be auto, cifar or imagenet"),
    ("label_smoothing", 1.0, r"--label-smoothing must be a finite number in \[0, 1\)"),
    ("lr_schedule", "linear", "--lr-schedule must be cosine or step"),
    ("lr_gamma", 0.0, r"--lr-gamma must be a finite number in \(0, 1\]"),
    ("lr_step", 0, "--lr-step must be an integer >= 1"),
])
def test_new_train_options_are_validated(field, value, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**{field: value}).validate()


def test_step_schedule_and_label_smoothing_in_training():
    from fastnas.train import Trainer

    cfg = TrainConfig(genotype="DARTS_V2", dataset="digits", limit=32, C=4, layers=3, epochs=3, batch_size=16,
                      eval_batch_size=360, max_steps=1, cutout=0, drop_path_prob=0.0, seed=3, device="cpu",
                      lr=0.1, lr_schedule="step", lr_gamma=0.5, lr_step=2, label_smoothing=0.1)
    trainer = Trainer(cfg, progress=False)
    assert trainer.train_criterion.label_smoothing == 0.1 and trainer.criterion.label_smoothing == 0.0
    result = trainer.run()
    assert [round(h["lr"], 6) for h in result.history] == [0.1, 0.1, 0.05]


def test_train_cli_refuses_the_imagenet_network_on_small_images(capsys, tmp_path):
    from fastnas import train as train_cli

    rc = train_cli.main(["--network", "imagenet", "--layers", "3", "--limit", "32", "--no-progress", "--out",
                         str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "input of 8x8 is too small for the ImageNet network" in err
    assert not list(tmp_path.iterdir())

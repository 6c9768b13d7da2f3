"""Retraining: the evaluation network (DARTS parity, attention ops, drop path), the loop, exact resume, the saved
model, the train and evaluate command lines, and their errors. Everything runs on tiny shapes."""
import json
import os
import re

import pytest
import torch
from torch import nn

import fastnas
from fastnas import evaluate as evaluate_cli
from fastnas import train as train_cli
from fastnas.config import TRAIN_PRESETS, TrainConfig
from fastnas.evalnet import AuxiliaryHead, EvalCell, EvalNet, auxiliary_geometry, drop_path
from fastnas.genotypes import DARTS_V2
from fastnas.nn import ChannelAttention, SpatialAttention
from fastnas.nn.operations import Gated
from fastnas.search import Search
from fastnas.train import Trainer
from helpers import tiny_search_config

# every input of both cell types reaches an attention gate; in the reduction cell at stride 2
ATTENTION = fastnas.Genotype(
    normal=[("channel_attention", 0), ("spatial_attention", 1), ("sep_conv_3x3", 2), ("channel_attention", 1)],
    normal_concat=[2, 3],
    reduce=[("spatial_attention", 0), ("channel_attention", 1), ("skip_connect", 2), ("spatial_attention", 0)],
    reduce_concat=[2, 3],
)
TINY_ARGS = ["--limit", "64", "--C", "4", "--layers", "3", "--epochs", "2", "--batch-size", "16", "--max-steps", "2",
             "--eval-batch-size", "360", "--device", "cpu", "--no-progress"]


def tiny_train_config(**overrides) -> TrainConfig:
    """Retraining that runs in about a second: 64 digits, C=4, 3 cells, 2 steps an epoch, drop path and cutout on."""
    base = dict(genotype="DARTS_V2", dataset="digits", limit=64, C=4, layers=3, epochs=2, batch_size=16,
                eval_batch_size=360, max_steps=2, cutout=2, drop_path_prob=0.3, seed=3, device="cpu")
    base.update(overrides)
    return TrainConfig(**base)


# -- the network --------------------------------------------------------------------------------------------------
def test_parameter_count_matches_original_darts():
    """DARTS's NetworkCIFAR with DARTS_V2 (C=36, 20 cells, CIFAR-10) logs 'param size = 3.349342MB', counting all
    parameters but the auxiliary head's; the head adds 476,426."""
    with_aux = EvalNet(DARTS_V2, 36, 20, 10, auxiliary=True, drop_path_prob=0.2)
    assert with_aux.param_count() == 3_349_342
    assert with_aux.param_count(auxiliary=True) == sum(p.numel() for p in with_aux.parameters()) == 3_825_768
    without = EvalNet(DARTS_V2, 36, 20, 10, auxiliary=False)
    assert sum(p.numel() for p in without.parameters()) == 3_349_342
    assert with_aux.aux_index == 13 and with_aux.auxiliary_head.features[2].in_channels == 576
    logits, aux = with_aux.train()(torch.randn(2, 3, 32, 32))  # the head sees 8x8 at 2/3 depth, as in DARTS
    assert logits.shape == aux.shape == (2, 10)


def test_auxiliary_head_has_darts_shape_on_cifar_and_adapts_to_small_inputs():
    assert auxiliary_geometry(8) == (5, 3, 2)  # DARTS: 8x8 → pool 5/3 → 2x2 → conv 2x2 → 1x1
    head = AuxiliaryHead(16, 10, 8)
    assert head.features[5].kernel_size == (2, 2)
    assert head(torch.randn(2, 16, 8, 8)).shape == (2, 10)
    assert auxiliary_geometry(2) == (2, 3, 1)  # the digits reach 2x2: pool to 1x1, then a 1x1 conv
    for size in (1, 2, 3, 5, 11):
        assert AuxiliaryHead(4, 7, size)(torch.randn(2, 4, size, size)).shape == (2, 7)


@pytest.mark.parametrize("layers", [1, 3, 5])
def test_outputs_training_and_eval(layers):
    net = EvalNet(DARTS_V2, 4, layers, 7, auxiliary=True, in_channels=1, input_size=8)
    x = torch.randn(3, 1, 8, 8)
    logits, aux = net.train()(x)
    assert logits.shape == aux.shape == (3, 7)
    assert net.eval()(x).shape == (3, 7)  # eval mode: the logits alone
    assert EvalNet(DARTS_V2, 4, layers, 7, in_channels=1, input_size=8).train()(x).shape == (3, 7)


def test_attention_ops_in_both_cells_at_both_strides():
    net = EvalNet(ATTENTION, 4, 3, 10, auxiliary=True, in_channels=1, input_size=8, steps=2)
    normal, reduce = net.cells[0], net.cells[1]
    assert isinstance(normal.ops[0], ChannelAttention) and isinstance(normal.ops[1], SpatialAttention)
    assert isinstance(reduce.ops[0], Gated) and isinstance(reduce.ops[0][1], SpatialAttention)  # stride 2
    assert isinstance(reduce.ops[1], Gated) and isinstance(reduce.ops[1][1], ChannelAttention)
    x = torch.randn(4, 1, 8, 8)
    net.eval()
    outputs = {}
    for backend in ("reference", "cpu"):  # the gates run on the fused ops of the selected backend
        with fastnas.ops.backend(backend):
            outputs[backend] = net(x)
    torch.testing.assert_close(outputs["cpu"], outputs["reference"], rtol=1e-5, atol=1e-6)
    net.train()
    logits, aux = net(x)
    (logits.sum() + aux.sum()).backward()
    gates = [m for m in net.modules() if isinstance(m, (ChannelAttention, SpatialAttention))]
    assert len(gates) == 3 * 3
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for g in gates for p in g.parameters())


def test_drop_path_masks_whole_samples_and_keeps_the_mean():
    torch.manual_seed(0)
    x = torch.ones(4000, 3, 2, 2)
    y = drop_path(x, 0.25)
    per_sample = y.flatten(1)
    assert set(per_sample.unique().tolist()) <= {0.0, torch.tensor(1 / 0.75).item()}
    assert torch.all(per_sample.min(1).values == per_sample.max(1).values)  # one decision per sample
    assert abs(y.mean().item() - 1.0) < 0.05
    assert drop_path(x, 0.0) is x
    t = drop_path(x, torch.tensor(0.25)).flatten(1)  # the 0-dim tensor form that a compiled network uses
    assert set(t.unique().tolist()) == {0.0, torch.tensor(1 / 0.75).item()}
    assert torch.all(t.min(1).values == t.max(1).values) and abs(t.mean().item() - 1.0) < 0.05


def test_drop_path_probability_is_a_setting_not_state():
    net = EvalNet(DARTS_V2, 4, 3, 10, in_channels=1, input_size=8, drop_path_prob=0.2)
    assert net.drop_path_prob == pytest.approx(0.2) and float(net._drop_prob) == pytest.approx(0.2)
    net.drop_path_prob = 0.1
    assert float(net._drop_prob) == pytest.approx(0.1)
    assert not any("drop" in k for k in net.state_dict())
    with pytest.raises(fastnas.ConfigError, match="drop_path_prob"):
        net.drop_path_prob = 1.0


def test_drop_path_only_in_training_and_never_on_identity():
    cell = EvalCell(DARTS_V2.normal, DARTS_V2.normal_concat, 8, 8, 4, False, False)
    s0, s1 = torch.randn(6, 8, 4, 4), torch.randn(6, 8, 4, 4)
    cell.train()
    torch.testing.assert_close(cell(s0, s1, 0.0), cell(s0, s1, 0.0))
    assert not torch.equal(cell(s0, s1, 0.5), cell(s0, s1, 0.5))
    cell.eval()
    assert torch.equal(cell(s0, s1, 0.9), cell(s0, s1, 0.0))
    # a cell of identities only: nothing to drop, whatever the probability
    skips = [("skip_connect", 0), ("skip_connect", 1), ("skip_connect", 1), ("skip_connect", 2)]
    ident = EvalCell(skips, [2, 3], 4, 4, 4, False, False).train()
    torch.testing.assert_close(ident(s0[:, :4], s1[:, :4], 0.9), ident(s0[:, :4], s1[:, :4], 0.0))


# -- the loop -----------------------------------------------------------------------------------------------------
def test_training_schedule_and_learning():
    t = Trainer(tiny_train_config(epochs=3, max_steps=None, limit=None, batch_size=64, drop_path_prob=0.3,
                                  C=8, cutout=0), progress=False)
    before = [p.detach().clone() for p in t.model.parameters()]
    result = t.run()
    assert [h["drop_path_prob"] for h in result.history] == pytest.approx([0.0, 0.1, 0.2])  # p · e / epochs
    assert result.history[0]["lr"] == pytest.approx(0.025) and result.history[2]["lr"] == pytest.approx(0.025 / 4)
    assert all(not torch.equal(a, b) for a, b in zip(before, t.model.parameters()))
    assert t.majority_baseline == pytest.approx(100 * 37 / 360)  # the stratified digits test split
    assert result.final_test_acc > t.majority_baseline + 30  # 3 epochs of a tiny net: far above the majority class
    assert result.best_test_acc == max(h["test_acc"] for h in result.history)
    assert result.param_count == t.model.param_count() < t.model.param_count(auxiliary=True)


def test_resume_equals_uninterrupted(tmp_path):
    (tmp_path / "a").mkdir()
    straight = Trainer(tiny_train_config(), tmp_path / "a", progress=False)
    straight.run()

    (tmp_path / "b").mkdir()
    interrupted = Trainer(tiny_train_config(), tmp_path / "b", progress=False)
    interrupted.run(until_epoch=1)  # as if killed after the first epoch's checkpoint
    state = fastnas.checkpoint.load(tmp_path / "b")
    torch.manual_seed(12345)  # a fresh process: whatever the global RNG holds, the checkpoint restores it
    resumed = Trainer(tiny_train_config(), tmp_path / "b", progress=False)
    resumed.load_state_dict(state)
    resumed.run()
    assert straight.history[-1]["drop_path_prob"] > 0  # the resumed epoch did drop paths and cutouts
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for ha, hb in zip(straight.history, resumed.history):
        assert {k: v for k, v in ha.items() if k not in ("seconds", "train_img_s")} == \
               {k: v for k, v in hb.items() if k not in ("seconds", "train_img_s")}


# -- command lines and the saved model -------------------------------------------------------------------------------
def test_cli_writes_every_output_and_evaluate_reads_it(tmp_path, capsys):
    run = tmp_path / "run"
    rc = train_cli.main(["--genotype", str(ATTENTION), "--steps", "2", "--run-dir", str(run)] + TINY_ARGS)
    assert rc == 0
    out = capsys.readouterr().out
    for name in ["config.json", "log.txt", "metrics.json", "checkpoint.pt", "genotype.json", "model.safetensors",
                 "model.json", "data.json"]:
        assert (run / name).stat().st_size > 0, name
    metrics = json.loads((run / "metrics.json").read_text())
    assert len(metrics["epochs"]) == 2 and metrics["finished"]
    for key in ["train_loss", "train_acc", "test_loss", "test_acc", "lr", "train_img_s", "drop_path_prob"]:
        assert key in metrics["epochs"][0]
    assert fastnas.Genotype.from_json(run / "genotype.json") == ATTENTION
    config = json.loads((run / "config.json").read_text())
    assert fastnas.Genotype.parse(config["genotype"]) == ATTENTION
    assert f"param size = {metrics['param_count'] / 1e6:.6f}MB" in out
    assert "param size" in (run / "log.txt").read_text()

    model = fastnas.load_model(run)
    assert isinstance(model, EvalNet) and not model.training and model.genotype == ATTENTION
    state = fastnas.checkpoint.load(run)["model"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)

    assert evaluate_cli.main([str(run)]) == 0
    printed = capsys.readouterr().out
    assert f"test accuracy: {metrics['final_test_acc']:.2f}%" in printed, printed

    # resume a finished run with more epochs
    assert train_cli.main(["--resume", str(run), "--epochs", "3", "--no-progress"]) == 0
    assert len(json.loads((run / "metrics.json").read_text())["epochs"]) == 3


def test_trains_the_genotype_a_search_wrote(tmp_path, capsys):
    search_dir = tmp_path / "search"
    search_dir.mkdir()
    found = Search(tiny_search_config(epochs=1), search_dir, progress=False).run().genotype
    run = tmp_path / "train"
    assert train_cli.main(["--genotype", str(search_dir), "--run-dir", str(run)] + TINY_ARGS) == 0
    assert fastnas.load_model(run).genotype == found
    assert train_cli.main(["--genotype", str(search_dir / "genotype.txt"), "--run-dir", str(tmp_path / "txt"),
                           "--epochs", "1"] + TINY_ARGS[:-3] + ["--no-progress"]) == 0


def test_genotype_argument_forms(tmp_path):
    assert train_cli.resolve_genotype("DARTS_V2") == DARTS_V2
    assert train_cli.resolve_genotype(str(DARTS_V2)) == DARTS_V2
    assert train_cli.resolve_genotype(DARTS_V2.to_json()) == DARTS_V2
    DARTS_V2.to_json(tmp_path / "g.json")
    assert train_cli.resolve_genotype(str(tmp_path / "g.json")) == DARTS_V2
    DARTS_V2.to_json(tmp_path / "genotype.json")
    assert train_cli.resolve_genotype(str(tmp_path)) == DARTS_V2  # a folder holding genotype.json
    (tmp_path / "genotype.txt").write_text(str(DARTS_V2) + "\n")
    assert train_cli.resolve_genotype(str(tmp_path / "genotype.txt")) == DARTS_V2


def test_presets():
    darts, at = TRAIN_PRESETS["darts"], TRAIN_PRESETS["at-darts"]
    assert (darts["epochs"], darts["batch_size"], darts["lr"], darts["cutout"], darts["drop_path_prob"],
            darts["auxiliary_weight"], darts["grad_clip"]) == (600, 96, 0.025, 16, 0.2, 0.4, 5.0)
    assert (at["epochs"], at["batch_size"]) == (600, 128)
    assert TRAIN_PRESETS["quick"]["dataset"] == "digits"


@pytest.mark.parametrize("argv,match", [
    (["--genotype", str(DARTS_V2).replace("dil_conv_3x3", "dil_conv_9x9")], "unknown op 'dil_conv_9x9'"),
    (["--genotype", str(ATTENTION)], r"2 nodes, the network expects 4 \(pass --steps"),
    (["--genotype", "DARTS_V9"], "neither a genotype file"),
    (["--genotype", "Genotype(normal=[('skip_connect', 5)]"], "cannot parse genotype"),
    (["--genotype", "/nonexistent/genotype.json"], "neither a genotype file"),
    (["--dataset", "cifar10", "--data-dir", "/nonexistent/data"], "cifar-10-batches-py"),
    (["--C", "5"], "even"),
    (["--drop-path-prob", "1.0"], "drop-path-prob"),
    (["--resume", "/nonexistent/run"], "no checkpoint"),
])
def test_cli_errors_are_one_clear_line(argv, match, capsys, tmp_path):
    rc = train_cli.main(argv + ["--no-progress", "--limit", "32", "--layers", "3", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert re.search(match, err), err
    assert not list(tmp_path.iterdir())  # no run folder left behind for a refused configuration


def test_search_folder_without_genotype_and_search_checkpoint_are_refused(tmp_path, capsys):
    search_dir = tmp_path / "search"
    search_dir.mkdir()
    Search(tiny_search_config(epochs=2), search_dir, progress=False).run(until_epoch=1)  # unfinished
    assert train_cli.main(["--genotype", str(search_dir)] + TINY_ARGS) == 2
    assert "holds no genotype.json" in capsys.readouterr().err
    assert train_cli.main(["--resume", str(search_dir)]) == 2
    assert "'search' checkpoint, not a train checkpoint" in capsys.readouterr().err


def test_evaluate_errors(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    Trainer(tiny_train_config(epochs=1), run, progress=False).run()
    assert evaluate_cli.main([str(run), "--dataset", "cifar10"]) == 2
    assert "trained on 'digits'" in capsys.readouterr().err
    assert evaluate_cli.main([str(tmp_path)]) == 2
    assert "no trained model" in capsys.readouterr().err
    (run / "model.safetensors").write_bytes(b"garbage")
    assert evaluate_cli.main([str(run)]) == 2
    assert "cannot read" in capsys.readouterr().err
    state = fastnas.checkpoint.load(run)
    state["config"]["dataset"] = "cifar10"
    with pytest.raises(fastnas.CheckpointError, match="trained on 'cifar10', not 'digits'"):
        Trainer(tiny_train_config(), progress=False).load_state_dict(state)


@pytest.mark.parametrize("amp,channels_last", [("bf16", True), ("fp16", False)])
def test_engine_options(amp, channels_last):
    t = Trainer(tiny_train_config(genotype=str(ATTENTION), steps=2, amp=amp, channels_last=channels_last, epochs=1),
                progress=False)
    result = t.run()
    assert all(torch.isfinite(p).all() for p in t.model.parameters())
    assert 0 <= result.final_test_acc <= 100


@pytest.mark.skipif(not os.environ.get("FASTNAS_SLOW_TESTS"),
                    reason="torch.compile of the network takes minutes on 2 CPU cores; set FASTNAS_SLOW_TESTS=1")
def test_compiled_training_matches_the_network():
    t = Trainer(tiny_train_config(genotype=str(ATTENTION), steps=2, compile=True, epochs=2, max_steps=1,
                                  backend="reference"), progress=False)
    t.run()
    x = torch.randn(5, 1, 8, 8)
    t.model.eval()
    torch.testing.assert_close(t.forward(x), t.model(x), rtol=1e-4, atol=1e-5)

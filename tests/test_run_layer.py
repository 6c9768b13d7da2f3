"""The run layer: each option declared once (parser, rules, config files), --config and --print-config, and the
TensorBoard event files of a short search and a short retraining. Tiny shapes."""
import dataclasses
import json

import pytest
import torch

from fastnas import search as search_cli
from fastnas import train as train_cli
from fastnas.config import SearchConfig, TrainConfig
from fastnas.options import Option, Rule

@pytest.fixture(autouse=True)
def _threads():
    """The runs below use one thread (as their config files record); the next tests get the count back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


TINY = ["--dataset", "digits", "--limit", "64", "--C", "4", "--layers", "3", "--epochs", "2", "--batch-size", "16",
        "--max-steps", "2", "--device", "cpu", "--threads", "1", "--no-progress"]


@pytest.mark.parametrize("config_class, module", [(SearchConfig, search_cli), (TrainConfig, train_cli)])
def test_every_field_has_a_cli_option_and_a_rule(config_class, module):
    """Adding an option is adding its field (fastnas/config.py): the parser and the rules come from it."""
    dests = {a.dest for a in module.build_parser()._actions}
    defaults = config_class()
    for field in dataclasses.fields(config_class):
        option = field.metadata.get("option")
        assert isinstance(option, Option) and isinstance(option.rule, Rule), field.name
        assert option.help, field.name
        assert field.name in dests, field.name
        assert option.rule.ok(getattr(defaults, field.name)), field.name  # the default obeys its own rule


def _without_clock(alphas: dict) -> dict:
    return {**alphas, "epochs": [{k: v for k, v in e.items() if k != "seconds"} for e in alphas["epochs"]]}


def test_config_file_run_equals_flags_run(tmp_path, capsys):
    flags = tmp_path / "flags"
    assert search_cli.main(TINY + ["--run-dir", str(flags)]) == 0
    capsys.readouterr()
    # --print-config writes the resolved configuration as YAML; the run's own config.json resolves to the same
    assert search_cli.main(TINY + ["--print-config"]) == 0
    printed = capsys.readouterr().out
    assert search_cli.main(["--config", str(flags / "config.json"), "--print-config"]) == 0
    assert capsys.readouterr().out == printed
    (tmp_path / "run.yaml").write_text(printed)
    from_file = tmp_path / "file"
    assert search_cli.main(["--config", str(tmp_path / "run.yaml"), "--no-progress", "--run-dir", str(from_file)]) == 0
    assert (from_file / "config.json").read_text() == (flags / "config.json").read_text()
    a, b = (json.loads((d / "alphas.json").read_text()) for d in (flags, from_file))
    assert _without_clock(a) == _without_clock(b)


def test_precedence_is_preset_then_file_then_command_line(tmp_path, capsys):
    import yaml

    (tmp_path / "c.yaml").write_text("preset: darts\nepochs: 3\nbatch_size: 8\n")
    assert search_cli.main(["--config", str(tmp_path / "c.yaml"), "--epochs", "4", "--print-config"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert (resolved["preset"], resolved["primitives"], resolved["order"]) == ("darts", "darts", 2)  # the preset
    assert resolved["batch_size"] == 8 and resolved["epochs"] == 4  # the file over the preset, flags over both


@pytest.mark.parametrize("content, match", [
    ("epochs: 2\nlrr: 0.1\n", "unknown option lrr"),
    ("lr: -1\n", r"--lr must be a finite number > 0, got -1 \(in "),
    ("amp: fp8\n", "--amp must be off, bf16 or fp16, got 'fp8'"),
    ("epochs: [2\n", "cannot read the configuration file"),
    ("- 1\n- 2\n", "must hold a mapping"),
])
def test_a_bad_config_file_is_one_line_exit_2(tmp_path, capsys, content, match):
    import re

    path = tmp_path / "bad.yaml"
    path.write_text(content)
    for module in (search_cli, train_cli):
        assert module.main(["--config", str(path), "--out", str(tmp_path / "runs"), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and re.search(match, err), err
        assert not (tmp_path / "runs").exists()


# -- TensorBoard ----------------------------------------------------------------------------------------------------
def _events(run_dir):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {**acc.Tags(), "hparams": list(acc.PluginTagToContent("hparams"))}


def test_tensorboard_of_a_search(tmp_path):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    assert search_cli.main(TINY + ["--run-dir", str(run), "--tensorboard"]) == 0
    tags = _events(run)
    assert {"search/train_loss", "search/train_acc", "search/valid_loss", "search/valid_acc", "search/lr",
            "search/img_s", "search/indicators/entropy/normal", "search/indicators/parameter_free/normal"} \
        <= set(tags["scalars"])
    assert {"search/alphas/normal", "search/alphas/reduce", "search/cells/normal", "search/cells/reduce"} \
        <= set(tags["images"])
    assert "search/genotype/text_summary" in tags["tensors"]
    assert "_hparams_/experiment" in tags["hparams"]


def test_tensorboard_of_a_retraining_and_its_off_switch(tmp_path):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    argv = TINY + ["--genotype", "DARTS_V2", "--eval-batch-size", "360", "--cutout", "0"]
    assert train_cli.main(argv + ["--run-dir", str(run), "--tensorboard"]) == 0
    tags = _events(run)
    assert {"train/train_loss", "train/train_acc", "train/test_loss", "train/test_acc", "train/lr",
            "train/img_s", "train/drop_path_prob"} <= set(tags["scalars"])
    assert {"train/cells/normal", "train/cells/reduce"} <= set(tags["images"])
    assert "train/genotype/text_summary" in tags["tensors"] and "_hparams_/experiment" in tags["hparams"]
    # --overwrite removes the old run's event files with its other outputs; --no-tensorboard writes none
    assert train_cli.main(argv + ["--run-dir", str(run), "--overwrite", "--no-tensorboard"]) == 0
    assert not list(run.glob("events.out.tfevents.*"))


def test_tensorboard_under_torchrun_is_written_by_rank_0_alone(tmp_path):
    pytest.importorskip("tensorboard")
    import test_distributed
    from test_distributed import SEARCH_ARGS, ok, torchrun

    if test_distributed.pytestmark.args[0]:
        pytest.skip(test_distributed.pytestmark.kwargs["reason"])

    ok(torchrun(["-m", "fastnas.search"], SEARCH_ARGS + ["--epochs", "1", "--run-dir", "run", "--tensorboard"],
                tmp_path))
    assert len(list((tmp_path / "run").glob("events.out.tfevents.*"))) == 1
    assert "search/valid_acc" in _events(tmp_path / "run")["scalars"]


def test_evalnet_defaults_follow_the_network():
    """DARTS's ImageNet network with its auxiliary head, without input_size spelled out: 224 pixels, as DARTS's."""
    from fastnas.evalnet import EvalNet
    from fastnas.genotypes import DARTS_V2

    assert EvalNet(DARTS_V2, 48, 14, 1000, auxiliary=True, network="imagenet").param_count(auxiliary=True) == 5_979_528
    assert EvalNet(DARTS_V2, 36, 20, 10, auxiliary=True).input_size == 32

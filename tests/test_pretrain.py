"""`lisa pretrain` end to end on CPU at toy sizes: both architectures, with LayerSync, write a
loadable main network, a curve with realism and feature distance, samples and the plot."""

import json

import pytest
import torch

from lisa_control.cli.pretrain import build_parser
from lisa_control.cli.pretrain import main as pretrain_main
from lisa_control.core.errors import LisaError
from lisa_control.families.loading import load_pixel_model

TOY = [
    "--task", "pose", "--train_size", "32", "--train_batch_size", "4", "--max_train_steps", "4",
    "--sample_every", "2", "--num_samples", "8", "--sample_steps", "2", "--lr_warmup_steps", "1",
    "--feature_distance", "--feature_network_steps", "3", "--device", "cpu",
]  # fmt: skip


@pytest.mark.parametrize(
    "architecture,extra",
    [
        (
            "unet",
            [
                "--block_out_channels",
                "8",
                "16",
                "--layers_per_block",
                "1",
                "--cross_attention_dim",
                "8",
            ],
        ),
        ("dit", ["--dit_layers", "3", "--dit_heads", "2", "--dit_head_dim", "8"]),
    ],
)
def test_pretrain_with_layersync_writes_a_loadable_model_and_curves(tmp_path, architecture, extra):
    out = tmp_path / architecture
    pretrain_main(
        [
            *TOY,
            *extra,
            "--architecture",
            architecture,
            "--regularizer",
            "layersync",
            "--output_dir",
            str(out),
        ]
    )
    losses = [json.loads(x) for x in (out / "loss_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in losses] == [1, 2, 3, 4]
    assert all(r["layersync_loss"] < 0 for r in losses)  # negative cosine, weight 0.2
    points = [json.loads(x) for x in (out / "curve.jsonl").read_text().splitlines()]
    assert [p["step"] for p in points] == [2, 4]
    for p in points:
        assert 0 <= p["realism"]["pose"] <= 1
        assert p["feature_distance"]["pose"] > 0
    assert (out / "samples" / "step-4.png").is_file()
    assert (out / "training_curve.png").is_file()
    model = load_pixel_model(out / "model")
    assert model.family.name == ("unet" if architecture == "unet" else "sd3")
    record = json.loads((out / "model" / "lisa_model.json").read_text())
    assert record["steps"] == 4 and "--regularizer layersync" in record["command"]


UNET = ["--block_out_channels", "8", "16", "--layers_per_block", "1", "--cross_attention_dim", "8"]
QUIET = ["--no-feature_distance", "--sample_every", "100"]


def _losses(folder):
    return [json.loads(x)["loss"] for x in (folder / "loss_log.jsonl").read_text().splitlines()]


def test_init_from_continues_the_saved_network_and_counts_its_steps(tmp_path):
    first = tmp_path / "first"
    pretrain_main([*TOY, *UNET, *QUIET, "--output_dir", str(first)])
    # A learning rate too small to move fp32 weights: the continued network must come out as
    # the one it started from, which proves the weights (not just the config) were loaded.
    pretrain_main(
        [*TOY, *QUIET, "--max_train_steps", "2", "--learning_rate", "1e-30",
         "--init_from", str(first / "model"), "--output_dir", str(tmp_path / "second")]
    )  # fmt: skip
    record = json.loads((tmp_path / "second" / "model" / "lisa_model.json").read_text())
    assert record["steps"] == 4 + 2
    assert record["initialized_from"] == str(first / "model")
    # the recorded command replays: it parses back to the arguments of this run
    replayed = build_parser().parse_args(
        record["command"].split()[2:] + ["--output_dir", str(tmp_path / "second")]
    )
    assert replayed.init_from == str(first / "model")
    assert replayed.feature_distance is False and replayed.torch_compile is False
    assert replayed.learning_rate == 1e-30 and replayed.max_train_steps == 2
    before = load_pixel_model(first / "model").main_network.state_dict()
    after = load_pixel_model(tmp_path / "second" / "model").main_network.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--architecture", "dit"], "--architecture unet"),
        (["--resolution", "16"], "--resolution 32"),
        (["--objective", "v_prediction"], "--objective epsilon"),
    ],
)
def test_init_from_refuses_a_network_the_flags_contradict(tmp_path, flags, message):
    first = tmp_path / "first"
    pretrain_main([*TOY, *UNET, *QUIET, "--max_train_steps", "1", "--output_dir", str(first)])
    with pytest.raises(LisaError, match=message):
        pretrain_main(
            [*TOY, *QUIET, *flags, "--init_from", str(first / "model"),
             "--output_dir", str(tmp_path / "second")]
        )  # fmt: skip


def test_compiled_pretraining_logs_the_eager_losses(tmp_path):
    # dynamo's eager backend traces and guards like inductor without generating code
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    pretrain_main([*TOY, *UNET, *QUIET, "--output_dir", str(eager)])
    pretrain_main(
        [*TOY, *UNET, *QUIET, "--torch_compile", "--torch_compile_backend", "eager",
         "--output_dir", str(compiled)]
    )  # fmt: skip
    assert _losses(compiled) == pytest.approx(_losses(eager), rel=1e-5)


def test_missing_init_from_is_one_line_before_any_work(tmp_path, capsys):
    from lisa_control.cli import main

    out = tmp_path / "run"
    code = main(
        ["pretrain", *TOY, "--init_from", str(tmp_path / "nowhere"), "--output_dir", str(out)]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("lisa pretrain: error:") and "does not exist" in err, err
    assert len(err.splitlines()) == 1
    assert not (out / "loss_log.jsonl").exists()

"""`lisa pretrain` end to end on CPU at toy sizes: both architectures, with LayerSync, write a
loadable main network, a curve with realism and feature distance, samples and the plot."""

import json

import pytest

from lisa_control.loading import load_pixel_model
from lisa_control.pretrain import main as pretrain_main

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
    assert model.family == ("unet" if architecture == "unet" else "sd3")
    record = json.loads((out / "model" / "lisa_model.json").read_text())
    assert record["steps"] == 4 and "--regularizer layersync" in record["command"]

"""The video main network: `lisa pretrain --task pose_video` writes a folder diffusers loads,
an image UNet joined with new motion modules starts as that UNet on every frame, the shipped
`embedded:pose_video` loads and runs, and `lisa demo --task pose_video` writes its preview."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDPMScheduler, UNetMotionModel

from lisa_control.cli import main
from lisa_control.cli.pretrain import main as pretrain_main
from lisa_control.core.errors import ConfigError
from lisa_control.families.animatediff import to_frames
from lisa_control.families.loading import load_main_model
from lisa_control.zoo.unet import tiny_unet
from lisa_control.zoo.video import motion_module_parameters, motion_unet_from_image

TINY_VIDEO = [
    "--task", "pose_video", "--num_frames", "4", "--train_size", "8", "--train_batch_size", "2",
    "--max_train_steps", "3", "--sample_every", "2", "--num_samples", "2", "--sample_steps", "2",
    "--lr_warmup_steps", "1", "--block_out_channels", "8", "16", "--layers_per_block", "1",
    "--cross_attention_dim", "8", "--no-feature_distance", "--device", "cpu",
]  # fmt: skip


def test_pretrain_pose_video_writes_a_motion_unet_folder_that_diffusers_loads(
    tmp_path, monkeypatch
):
    """3 steps on a tiny motion UNet: the saved folder loads with UNetMotionModel and
    DDPMScheduler as they are and gives the in-memory network's output; the curve has the
    clips' realism and the samples are animations."""
    from PIL import Image

    import lisa_control.training.pretrain as pretrain_module

    saved = {}
    save = pretrain_module.save_pixel_model

    def keep(folder, network, *args, **kwargs):
        saved["network"] = network
        return save(folder, network, *args, **kwargs)

    monkeypatch.setattr(pretrain_module, "save_pixel_model", keep)
    out = tmp_path / "run"
    pretrain_main([*TINY_VIDEO, "--output_dir", str(out)])

    loaded = UNetMotionModel.from_pretrained(out / "model" / "unet")
    DDPMScheduler.from_pretrained(out / "model" / "scheduler")
    record = json.loads((out / "model" / "lisa_model.json").read_text())
    assert record["family"] == "animatediff" and record["task"] == "pose_video"
    assert record["steps"] == 3
    x = torch.randn(1, 3, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    states = torch.zeros(4, 1, 8)  # the null context, once per frame
    with torch.no_grad():
        expected = saved["network"](x, 500, encoder_hidden_states=states).sample
        got = loaded(x, 500, encoder_hidden_states=states).sample
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected)

    points = [json.loads(line) for line in (out / "curve.jsonl").read_text().splitlines()]
    assert [p["step"] for p in points] == [2, 3]
    assert 0 <= points[-1]["realism"]["pose_video"] <= 1
    assert points[-1]["realism_of_training_images"]["pose_video"] == 1.0
    with Image.open(out / "samples" / "step-3.gif") as gif:
        assert gif.n_frames == 4 and gif.size == (2 + 2 * 34, 2 + 34)  # two clips in a row
    assert (out / "samples" / "step-3_frames.png").is_file()
    model = load_main_model(str(out / "model"))  # what `lisa train` takes
    assert model.family.takes_video and model.task == "pose_video"


def test_an_image_unet_joined_with_motion_modules_starts_as_that_unet_on_every_frame():
    from diffusers import UNet2DConditionModel

    config = tiny_unet(block_out_channels=(8, 16), layers_per_block=1, cross_attention_dim=8,
                       attention_at_full_resolution=False)  # fmt: skip
    unet = UNet2DConditionModel(**config).eval()
    video = motion_unet_from_image(unet).eval()
    assert motion_module_parameters(video) and not motion_module_parameters(unet)
    x = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        joined = video(x, torch.tensor([10, 900]), encoder_hidden_states=torch.zeros(8, 1, 8))
        per_frame = unet(
            to_frames(x), torch.tensor([10, 900]).repeat_interleave(4),
            encoder_hidden_states=torch.zeros(8, 1, 8),
        )  # fmt: skip
    torch.testing.assert_close(to_frames(joined.sample), per_frame.sample, atol=1e-5, rtol=0)


def test_init_from_an_image_unet_trains_only_new_motion_modules_and_continues(tmp_path):
    """An image UNet from `lisa pretrain` gives a video network its spatial layers, which
    --motion_modules_only keeps as they were while the motion modules learn; the video folder
    then continues as any `lisa pretrain` folder, counting its own steps."""
    from lisa_control.families.animatediff import image_unet_of
    from lisa_control.families.loading import load_pixel_model

    image, video, more = tmp_path / "image", tmp_path / "video", tmp_path / "more"
    as_image = TINY_VIDEO[4:]  # without --task pose_video --num_frames 4
    pretrain_main(
        ["--task", "pose", *as_image, "--max_train_steps", "1", "--output_dir", str(image)]
    )
    pretrain_main([*TINY_VIDEO, "--init_from", str(image / "model"), "--motion_modules_only",
                   "--max_train_steps", "2", "--output_dir", str(video)])  # fmt: skip
    spatial = load_pixel_model(image / "model").main_network.state_dict()
    network = load_pixel_model(video / "model").main_network
    for key, value in image_unet_of(network).state_dict().items():
        assert torch.equal(value, spatial[key]), key
    moved = [p for n, p in network.named_parameters() if "motion_modules" in n and "proj_out" in n]
    assert moved and all(p.abs().sum() > 0 for p in moved)  # they started at zero
    record = json.loads((video / "model" / "lisa_model.json").read_text())
    assert record["steps"] == 2 and record["initialized_from"] == str(image / "model")

    pretrain_main([*TINY_VIDEO, "--init_from", str(video / "model"), "--max_train_steps", "1",
                   "--output_dir", str(more)])  # fmt: skip
    assert json.loads((more / "model" / "lisa_model.json").read_text())["steps"] == 2 + 1


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--task", "pose", "--architecture", "motion_unet"], "motion_unet denoises videos"),
        (["--task", "pose_video", "--architecture", "unet"], "pass --architecture motion_unet"),
        (["--task", "pose_video,pose"], "mixes video tasks"),
        (["--task", "pose", "--motion_modules_only"], "--motion_modules_only trains"),
    ],
)
def test_pretrain_refuses_a_network_that_cannot_denoise_the_data_in_one_line(
    tmp_path, capsys, flags, message
):
    code = main(["pretrain", *flags, "--output_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err


def test_embedded_pose_video_is_a_motion_unet_that_denoises_clips():
    model = load_main_model("embedded:pose_video")
    network = model.main_network
    assert isinstance(network, UNetMotionModel) and model.family.takes_video
    assert model.task == "pose_video" and model.resolution == 32
    x = torch.randn(1, 3, 8, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model.family.predict(network, x, torch.tensor([500]), model.null_context(1))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_demo_pose_video_writes_the_preview_animation_and_the_curve(tmp_path):
    from PIL import Image

    out = tmp_path / "demo"
    code = main(["demo", "--task", "pose_video", "--steps", "1", "--eval_every", "1",
                 "--eval_conditions", "2", "--inference_steps", "1", "--train_batch_size", "1",
                 "--device", "cpu", "--output_dir", str(out)])  # fmt: skip
    assert code == 0
    with Image.open(out / "preview.gif") as gif:
        # two held-out clips of 8 frames, condition | plain | LISA, 32 px with 2 px gutters
        assert gif.n_frames == 8 and gif.size == (2 + 3 * 34, 2 + 2 * 34)
    report = (out / "report.md").read_text()
    assert "| step | plain pck | LISA pck |" in report and "(preview.gif)" in report
    assert "temporal_consistency" in report
    assert (out / "convergence.png").stat().st_size > 1000
    results = json.loads((out / "results.json").read_text())
    assert results["args"]["train_batch_size"] == 1 and results["args"]["learning_rate"] == 5e-4
    for run in ("plain", "lisa"):
        assert [v["step"] for v in results["runs"][run]["validation"]] == [1]


def test_demo_fills_image_or_video_defaults_by_the_task():
    from lisa_control.cli.demo import IMAGE_DEFAULTS, VIDEO_DEFAULTS, build_parser, fill_defaults

    image = fill_defaults(build_parser().parse_args([]))
    video = fill_defaults(build_parser().parse_args(["--task", "pose_video", "--steps", "5"]))
    assert image.task == "pose" and image.steps == IMAGE_DEFAULTS["steps"] == 80
    assert image.train_batch_size == 16 and image.eval_conditions == 16
    assert video.steps == 5 and video.train_batch_size == VIDEO_DEFAULTS["train_batch_size"]
    with pytest.raises(ConfigError):
        fill_defaults(build_parser().parse_args(["--task", "no_such_task"]))

"""`lisa sample` (output folders, metadata conditions, batch-size invariance) and `lisa eval`
(embedded tasks scored as validation scores them, user folders with an extractor, Fréchet and
CLIP scores, checkpoint series with their curve, and one-line refusals of bad input), on tiny
models and data made here."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from factories import make_image_folder, make_pixel_model, tiny_clip
from PIL import Image

from lisa_control.cli import main

RES = 16


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny pose pixel model (16 px) and a ControlNet for it whose weights are perturbed away
    from zero, so that the condition changes the samples."""
    from lisa_control.families import UNetControlNetBranch
    from lisa_control.families.loading import load_main_model

    root = tmp_path_factory.mktemp("assets")
    model_dir = make_pixel_model(root / "model", resolution=RES, task="pose")
    model = load_main_model(str(model_dir))
    torch.manual_seed(0)
    branch = UNetControlNetBranch.from_main(model.main_network, None, condition_downscale=1)
    with torch.no_grad():
        for p in branch.side_network.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    branch.save_side_network(root / "controlnet")
    return SimpleNamespace(model=model_dir, controlnet=root / "controlnet", root=root)


def quirky_condition_folder(folder: Path) -> list[str]:
    """Condition images as users have them: RGBA with transparency, grayscale of another size,
    a non-square JPEG, a 16-bit PNG, one named like the grid, and files that are not conditions.
    Returns the stems `lisa sample` must take, in order."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    rgba = rng.integers(0, 256, (RES, RES, 4), dtype=np.uint8)
    rgba[:4, :, 3] = 0
    Image.fromarray(rgba, "RGBA").save(folder / "a_rgba.png")
    Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8), "L").save(folder / "b_gray.png")
    Image.fromarray(rng.integers(0, 256, (17, 23, 3), dtype=np.uint8)).save(folder / "c_odd.JPG")
    wide = rng.integers(0, 65536, (RES, RES)).astype(np.uint16)
    Image.fromarray(wide).save(folder / "d_16bit.png")
    Image.fromarray(rng.integers(0, 256, (RES, RES, 3), dtype=np.uint8)).save(folder / "grid.png")
    (folder / "notes.txt").write_text("not an image")
    Image.fromarray(np.zeros((RES, RES, 3), np.uint8)).save(folder / ".hidden.png")
    return ["a_rgba", "b_gray", "c_odd", "d_16bit", "grid-1"]


def sample_argv(assets, *extra) -> list[str]:
    return ["sample", "--controlnet", str(assets.controlnet), "--pretrained_model_name_or_path",
            str(assets.model), "--num_inference_steps", "2", *map(str, extra)]  # fmt: skip


def eval_argv(assets, out, *extra) -> list[str]:
    return ["eval", "--pretrained_model_name_or_path", str(assets.model), "--num_inference_steps",
            "2", "--output_dir", str(out), "--no-progress", *map(str, extra)]  # fmt: skip


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err, err
    assert "Traceback" not in err
    return err


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def assert_same_image(a: np.ndarray, b: np.ndarray) -> None:
    """The same sample drawn in another batch: the noise is the same, and batched CPU kernels
    sum in another order (float differences ~1e-5), which can move a pixel that sits on a
    rounding boundary by one level, and nothing more."""
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())


# ----------------------------------------------------------------------------- lisa sample


def test_sample_folder_writes_one_image_per_condition_independent_of_batch_size(assets, tmp_path):
    conditions = tmp_path / "conditions"
    stems = quirky_condition_folder(conditions)
    outs = {}
    for batch_size in (1, 3):
        out = tmp_path / f"out{batch_size}"
        argv = sample_argv(assets, "--image", conditions, "--batch_size", batch_size,
                           "--output_dir", out)  # fmt: skip
        assert main(argv) == 0
        outs[batch_size] = out
        names = sorted(p.name for p in out.iterdir())
        assert names == sorted([f"{s}.png" for s in stems] + ["grid.png"])
        for stem in stems:
            assert pixels(out / f"{stem}.png").shape == (RES, RES, 3)
        # grid: one row per condition, condition | sample
        assert pixels(out / "grid.png").shape == (2 + 5 * (RES + 2), 2 + 2 * (RES + 2), 3)
    for stem in stems:
        assert_same_image(pixels(outs[1] / f"{stem}.png"), pixels(outs[3] / f"{stem}.png"))
    # different conditions give different samples (the side network is not a no-op)
    assert not np.array_equal(pixels(outs[1] / "a_rgba.png"), pixels(outs[1] / "b_gray.png"))


def test_sampler_draws_each_condition_from_its_own_generator(assets):
    from lisa_control.eval.generate import SideNetworkSampler, condition_noise, condition_seed
    from lisa_control.families.loading import load_main_model

    assert condition_seed(7, 0) == 7 and condition_seed(7, 1) != condition_seed(8, 0)
    first = condition_noise(7, 0, (3, 4, 4))
    np.testing.assert_array_equal(
        first, torch.randn((1, 3, 4, 4), generator=torch.Generator().manual_seed(7))
    )
    assert not torch.equal(condition_noise(7, 0, (3, 4, 4), draw=1), first)

    sampler = SideNetworkSampler(load_main_model(str(assets.model)), assets.controlnet,
                                 num_inference_steps=2, device="cpu")  # fmt: skip
    conditions = torch.rand(4, 3, RES, RES, generator=torch.Generator().manual_seed(0))
    prompts = [""] * 4
    together = sampler(conditions, prompts, seed=3, batch_size=4)
    assert together.shape == (4, 3, RES, RES) and together.abs().max() <= 1
    # the same noise per condition; the rest is batched kernels' float rounding
    one_by_one = sampler(conditions, prompts, seed=3, batch_size=1)
    torch.testing.assert_close(together, one_by_one, rtol=0, atol=1e-4)
    # condition 2 alone, with its index, is the same image
    torch.testing.assert_close(
        one_by_one[2:3], sampler(conditions[2:3], [""], indices=[2], seed=3), rtol=0, atol=0
    )
    assert not torch.equal(together, sampler(conditions, prompts, seed=4, batch_size=4))


def test_sample_reads_metadata_jsonl_with_chosen_columns(assets, tmp_path, capsys):
    from lisa_control.eval.conditions import read_conditions

    data = tmp_path / "data"
    for sub in ("left", "right"):
        (data / sub).mkdir(parents=True)
        Image.fromarray(np.full((RES, RES, 3), 200, np.uint8)).save(data / sub / "x.png")
    rows = [{"cond": "left/x.png", "caption": "a red car"},
            {"cond": "right/x.png", "caption": ["a blue car", "a car"]}]  # fmt: skip
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    found = read_conditions([data / "metadata.jsonl"], "cond", "caption")
    assert [c.name for c in found] == ["x", "x-1"]
    assert [c.prompt for c in found] == ["a red car", "a blue car"]
    assert [c.path for c in found] == [data / "left" / "x.png", data / "right" / "x.png"]
    # a folder holding metadata.jsonl reads the same rows
    assert [c.path for c in read_conditions([data], "cond", "caption")] == [c.path for c in found]

    out = tmp_path / "out"
    argv = sample_argv(assets, "--image", data / "metadata.jsonl", "--conditioning_image_column",
                       "cond", "--caption_column", "caption", "--output_dir", out,
                       "--output", tmp_path / "single.png", "--num_images", 2)  # fmt: skip
    assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "grid.png",
        "x-1_0.png",
        "x-1_1.png",
        "x_0.png",
        "x_1.png",
    ]
    np.testing.assert_array_equal(pixels(tmp_path / "single.png"), pixels(out / "grid.png"))
    assert not np.array_equal(pixels(out / "x_0.png"), pixels(out / "x_1.png"))

    argv = sample_argv(assets, "--image", data / "metadata.jsonl", "--output", tmp_path / "n.png")
    assert main(argv) == 2
    err = one_line_error(capsys)
    assert "'conditioning_image'" in err and "--conditioning_image_column" in err


def test_sample_output_flag_alone_writes_the_grid_as_before(assets, tmp_path):
    data = make_image_folder(tmp_path / "data", n=2, size=RES)
    grid = tmp_path / "grid" / "s.png"
    argv = sample_argv(assets, "--image", data / "cond0.png", data / "cond1.png",
                       "--prompt", "item", "--output", grid)  # fmt: skip
    assert main(argv) == 0
    assert pixels(grid).shape == (2 + 2 * (RES + 2), 2 + 2 * (RES + 2), 3)
    assert sorted(p.name for p in grid.parent.iterdir()) == ["s.png"]


@pytest.mark.parametrize("flag", ["--num_inference_steps", "--batch_size", "--num_images"])
def test_sample_refuses_counts_below_one_in_one_line(assets, tmp_path, capsys, flag):
    data = make_image_folder(tmp_path / "data", n=1, size=RES)
    out = tmp_path / "s.png"
    argv = sample_argv(assets, "--image", data / "cond0.png", "--output", out, flag, 0)
    assert main(argv) == 2  # today's alternative: exit 0 with a grid of pure noise
    err = one_line_error(capsys)
    assert f"{flag} must be >= 1, got 0" in err
    assert not out.exists()


def test_stable_diffusion_sampling_is_the_stock_pipeline_and_batch_invariant(tmp_path):
    """ControlNets on SD UNets go through StableDiffusionControlNetPipeline with each
    condition's noise passed as latents: condition 0 draws what the pipeline draws with
    manual_seed(seed), and batching does not change any image."""
    from diffusers import (
        ControlNetModel,
        DPMSolverMultistepScheduler,
        StableDiffusionControlNetPipeline,
        StableDiffusionPipeline,
    )
    from factories import make_sd_model

    model_dir = make_sd_model(tmp_path / "sd")
    pipe = StableDiffusionPipeline.from_pretrained(model_dir)
    torch.manual_seed(0)
    controlnet = ControlNetModel.from_unet(pipe.unet)
    controlnet.save_pretrained(tmp_path / "cn")
    data = make_image_folder(tmp_path / "data", n=3, size=64)
    outs = []
    for batch_size in (1, 3):
        out = tmp_path / f"out{batch_size}"
        argv = ["sample", "--controlnet", tmp_path / "cn", "--pretrained_model_name_or_path",
                model_dir, "--image", data, "--num_inference_steps", 2, "--batch_size",
                batch_size, "--seed", 5, "--output_dir", out]  # fmt: skip
        argv = [str(a) for a in argv]
        assert main(argv) == 0
        outs.append(out)
    for name in ("cond0.png", "cond1.png", "cond2.png"):
        assert_same_image(pixels(outs[0] / name), pixels(outs[1] / name))
    stock = StableDiffusionControlNetPipeline(
        **{k: v for k, v in pipe.components.items() if k != "image_encoder"}, controlnet=controlnet
    )
    stock.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    condition = torch.from_numpy(pixels(data / "cond0.png").astype(np.float32) / 255)
    generator = torch.Generator().manual_seed(5)
    image = stock("item 0", image=condition.permute(2, 0, 1)[None], num_inference_steps=2,
                  generator=generator, output_type="np").images[0]  # fmt: skip
    expected = (image * 255).round().astype(int)
    assert np.abs(pixels(outs[0] / "cond0.png").astype(int) - expected).max() <= 1


# ----------------------------------------------------------------------------- lisa eval: tasks


def test_eval_on_an_embedded_task_scores_as_validation_and_the_benchmark_do(assets, tmp_path):
    """`lisa eval` on the pose task draws validation's held-out conditions and its metric is the
    number `Validator.run` (what `lisa train` logs to validation.jsonl, which the convergence
    benchmark reads) gives for the same samples."""
    from lisa_control.data.tasks import TaskDataset, get_task
    from lisa_control.eval.evaluate import EvalConfig, evaluate
    from lisa_control.eval.validation import Validator
    from lisa_control.families import UNetControlNetBranch
    from lisa_control.families.encoders import FrozenEncoders
    from lisa_control.families.loading import load_main_model, load_side_network

    cfg = EvalConfig(output_dir=str(tmp_path / "lib"), controlnet=str(assets.controlnet),
                     pretrained_model_name_or_path=str(assets.model), num_conditions=5,
                     num_inference_steps=2, batch_size=2, seed=1, frechet=False)  # fmt: skip
    report = evaluate(cfg)
    images = report.pop("images")
    assert report["data"] == {"kind": "task", "task": "pose", "resolution": RES,
                              "held_out_seed": 10_008, "num_conditions": 5}  # fmt: skip
    assert report["metric"] == "pck" and report["higher_is_better"] is True
    assert set(report["metrics"]) == {"pck", "detected", "joint_error"}

    model = load_main_model(str(assets.model))
    task = get_task("pose", resolution=RES)
    train_cfg = SimpleNamespace(validation_inference_steps=2, validation_guidance_scale=1.0,
                                seed=1, validation_image=None, validation_conditions=5,
                                validation_feature_distance=False)  # fmt: skip
    encoders = FrozenEncoders(model, "cpu")
    validator = Validator.from_config(train_cfg, model, TaskDataset(task, 8, 1), encoders, RES)
    assert [s.caption for s in validator.task_samples] == [
        r["prompt"] for r in report["per_condition"]
    ]
    side = load_side_network(str(assets.controlnet))
    branch = UNetControlNetBranch(model.main_network, side)
    validator.generate = lambda branch: images[:, None]  # the very samples lisa eval scored
    driver = validator.run(branch, 0, tmp_path / "validation")
    assert driver == report["metrics"]
    per_condition_pck = [r["pck"] for r in report["per_condition"]]
    assert np.mean(per_condition_pck) == pytest.approx(report["metrics"]["pck"])

    # the CLI writes the same numbers, and its command
    out = tmp_path / "cli"
    argv = eval_argv(
        assets,
        out,
        "--controlnet",
        assets.controlnet,
        "--task",
        "pose",
        "--num_conditions",
        5,
        "--batch_size",
        5,
        "--seed",
        1,
        "--no_frechet",
    )
    assert main(argv) == 0
    written = json.loads((out / "eval.json").read_text())
    assert written["metrics"] == report["metrics"]
    assert written["command"] == "lisa eval " + " ".join(argv[1:])
    assert written["settings"]["batch_size"] == 5 and written["settings"]["resolution"] == RES
    assert written["settings"]["model"] == str(assets.model)
    assert written["frechet"] is None and "checkpoints" not in written
    sheet = pixels(out / "samples.png")
    assert sheet.shape == (2 + 5 * (RES + 2), 2 + 3 * (RES + 2), 3)  # condition|sample|truth


def test_eval_task_frechet_goes_through_torchmetrics_and_matches_the_project_formula(
    assets, tmp_path, monkeypatch
):
    pytest.importorskip("torchmetrics")
    from lisa_control.data.tasks import get_task
    from lisa_control.eval import metrics
    from lisa_control.eval.evaluate import EvalConfig, evaluate
    from lisa_control.eval.feature_distance import TaskFeatureDistance

    settings = dict(controlnet=str(assets.controlnet),
                    pretrained_model_name_or_path=str(assets.model), task="edges",
                    num_conditions=6, num_inference_steps=2, feature_train_steps=3,
                    feature_pool=64, feature_reference_size=24)  # fmt: skip
    report = evaluate(EvalConfig(output_dir=str(tmp_path / "tm"), **settings))
    assert report["frechet"]["backend"] == "torchmetrics"
    assert report["frechet"]["reference_size"] == 24
    distance = TaskFeatureDistance(get_task("edges", resolution=RES), reference_size=24,
                                   train_steps=3, pool=64, device="cpu")  # fmt: skip
    expected = distance(report["images"])  # validation's feature distance, hand-written formula
    assert report["metrics"]["frechet_distance"] == pytest.approx(expected, rel=1e-4, abs=1e-9)

    monkeypatch.setattr(metrics, "torchmetrics_available", lambda: False)
    report = evaluate(EvalConfig(output_dir=str(tmp_path / "own"), **settings))
    written = json.loads((tmp_path / "own" / "eval.json").read_text())
    assert written["frechet"]["backend"] == "lisa_control"
    assert "torchmetrics is not installed" in written["frechet"]["note"]
    assert written["metrics"]["frechet_distance"] == pytest.approx(expected, rel=1e-9)


def test_frechet_backends_agree_on_features():
    pytest.importorskip("torchmetrics")
    from lisa_control.eval.metrics import frechet_from_features

    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(200, 6, generator=g), torch.randn(150, 6, generator=g) * 1.5 + 0.3
    ours, name = frechet_from_features(real, fake, backend="lisa_control")
    theirs, other = frechet_from_features(real, fake)
    assert (name, other) == ("lisa_control", "torchmetrics")
    assert theirs == pytest.approx(ours, rel=1e-6)


# ----------------------------------------------------------------------------- lisa eval: user data


def make_tiny_clip(folder: Path) -> Path:
    """A random CLIPModel (16-d text and 16 px vision towers) with tokenizer and processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTextModel

    text, tokenizer = tiny_clip(folder, CLIPTextModel)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, image_size=16, patch_size=8)  # fmt: skip
    torch.manual_seed(0)
    config = CLIPConfig(text_config=text.config.to_dict(), vision_config=vision, projection_dim=8)
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(
        size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}
    ).save_pretrained(folder)
    return folder


def make_edge_test_folder(folder: Path) -> list[str]:
    """Shape images whose conditions are their Canny edges, saved as grayscale, RGBA (edges
    opaque, the rest transparent) and RGB; one pair is 24x32, the others 16x16. Returns the
    condition stems in row order."""
    from lisa_control.data.tasks import get_task
    from lisa_control.eval.extractors import canny

    folder.mkdir(parents=True)
    task = get_task("edges", resolution=32)
    rows, stems = [], []
    for k in range(4):
        image = task.sample(5, k).image
        image = image[4:28, :] if k == 2 else image[::2, ::2]  # 24x32 or 16x16
        edges = canny(image[None])[0]
        Image.fromarray(image).save(folder / f"img{k}.png")
        if k == 0:
            Image.fromarray((edges * 255).astype(np.uint8), "L").save(folder / "edge0.png")
        elif k == 1:
            rgba = np.zeros((*edges.shape, 4), np.uint8)
            rgba[edges] = 255
            Image.fromarray(rgba, "RGBA").save(folder / "edge1.png")
        else:
            Image.fromarray(np.repeat((edges * 255).astype(np.uint8)[..., None], 3, -1)).save(
                folder / f"edge{k}.png"
            )
        rows.append({"image": f"img{k}.png", "conditioning_image": f"edge{k}.png",
                     "text": f"shape {k}"})  # fmt: skip
        stems.append(f"edge{k}")
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return stems


def test_eval_user_folder_with_edges_frechet_and_clip(assets, tmp_path):
    data = tmp_path / "test"
    stems = make_edge_test_folder(data)
    clip = make_tiny_clip(tmp_path / "clip")
    out = tmp_path / "eval"
    argv = eval_argv(assets, out, "--controlnet", assets.controlnet, "--test_data_dir", data,
                     "--extractor", "edges", "--clip_model", clip, "--feature_train_steps", 3,
                     "--batch_size", 3)  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["data"] == {"kind": "folder", "path": str(data), "rows": 4,
                              "num_conditions": 4, "selection_seed": None}  # fmt: skip
    assert report["metric"] == "edge_f1" and report["higher_is_better"] is True
    metrics = report["metrics"]
    assert set(metrics) == {"edge_f1", "edge_precision", "edge_recall", "reference_edge_f1",
                            "reference_edge_precision", "reference_edge_recall",
                            "frechet_distance", "clip_score"}  # fmt: skip
    # the conditions are the Canny edges of the 16x16 images: re-extraction from the real images
    # reproduces them (the 24x32 pair is resized, which moves a few edges)
    assert metrics["reference_edge_f1"] > 0.8
    rows = report["per_condition"]
    assert [r["name"] for r in rows] == stems
    assert [r["prompt"] for r in rows] == [f"shape {k}" for k in range(4)]
    for key in ("edge_f1", "clip_score"):
        assert np.mean([r[key] for r in rows]) == pytest.approx(metrics[key])
    assert all(0 <= r["edge_f1"] <= 1 and 0 <= r["clip_score"] <= 100 for r in rows)
    assert np.isfinite(metrics["frechet_distance"]) and metrics["frechet_distance"] >= 0
    assert report["frechet"]["backend"] in ("torchmetrics", "lisa_control")
    assert report["frechet"]["features"] == "task feature network trained on the real test images"
    assert report["settings"]["extractor_settings"] == {
        "low_threshold": 100.0,
        "high_threshold": 200.0,
        "tolerance": 1,
    }
    # condition | sample | real image | edges of the sample
    assert pixels(out / "samples.png").shape == (2 + 4 * (RES + 2), 2 + 4 * (RES + 2), 3)


def test_eval_user_folder_subset_and_test_subfolder(assets, tmp_path):
    from lisa_control.eval.evaluate import EvalConfig, evaluate

    data = make_image_folder(tmp_path / "dataset" / "test", n=6, size=RES)
    assert data.name == "test"
    cfg = EvalConfig(output_dir=str(tmp_path / "e"), controlnet=str(assets.controlnet),
                     pretrained_model_name_or_path=str(assets.model),
                     test_data_dir=str(tmp_path / "dataset"), num_conditions=3, seed=2,
                     num_inference_steps=2, frechet=False)  # fmt: skip
    report = evaluate(cfg)
    expected = sorted(np.random.default_rng(2).permutation(6)[:3].tolist())
    assert [r["index"] for r in report["per_condition"]] == expected
    assert [r["name"] for r in report["per_condition"]] == [f"cond{i}" for i in expected]
    assert report["data"]["path"] == str(data) and report["data"]["selection_seed"] == 2
    assert report["metric"] is None and report["metrics"] == {}
    assert any("--extractor" in note for note in report["notes"])


# ----------------------------------------------------------------------------- checkpoint series


def test_eval_checkpoint_series_writes_the_curve_in_step_order(assets, tmp_path):
    run = tmp_path / "run"
    train = ["train", "--pretrained_model_name_or_path", str(assets.model), "--task", "pose",
             "--resolution", str(RES), "--train_batch_size", "2", "--max_train_steps", "3",
             "--checkpointing_steps", "1", "--validation_steps", "1000", "--learning_rate",
             "1e-2", "--seed", "0", "--output_dir", str(run), "--report_to", "none",
             "--no-progress"]  # fmt: skip
    assert main(train) == 0
    # an unfinished checkpoint (no trainer state) is not evaluated
    (run / "checkpoint-9" / "side_network").mkdir(parents=True)
    out = tmp_path / "eval"
    # no model flag: the run's config.json names the main model and the task
    argv = ["eval", "--checkpoints", str(run / "checkpoint-3"), str(run / "checkpoint-*"),
            "--num_conditions", "3", "--num_inference_steps", "2", "--no_frechet",
            "--curve_metric", "joint_error", "--threshold", "0.0", "--output_dir", str(out),
            "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "eval.json").read_text())
    assert [c["step"] for c in report["checkpoints"]] == [1, 2, 3]
    assert [c["path"] for c in report["checkpoints"]] == [
        str((run / f"checkpoint-{s}" / "side_network").resolve()) for s in (1, 2, 3)
    ]
    assert report["metrics"] == report["checkpoints"][-1]["metrics"]
    assert report["settings"]["pretrained_model_name_or_path"] == str(assets.model)
    assert report["data"]["task"] == "pose"
    assert any("config.json" in note and "task=pose" in note for note in report["notes"])
    curve = json.loads((out / "curve.json").read_text())
    assert curve["steps"] == [1, 2, 3] and [p["step"] for p in curve["points"]] == [1, 2, 3]
    assert curve["metric"] == "joint_error" and curve["higher_is_better"] is False
    assert curve["values"] == [c["metrics"]["joint_error"] for c in report["checkpoints"]]
    assert curve["threshold"] == 0.0 and curve["steps_to_threshold"] is None  # never that good
    assert report["curve"]["steps_to_threshold"] is None
    assert (out / "curve.png").stat().st_size > 1000
    for step in (1, 2, 3):
        assert (out / f"samples-step-{step}.png").is_file()
    np.testing.assert_array_equal(pixels(out / "samples.png"), pixels(out / "samples-step-3.png"))

    # a threshold the first checkpoint already meets
    first = curve["values"][0]
    argv[argv.index("--threshold") + 1] = str(first)
    assert main(argv) == 0
    assert json.loads((out / "curve.json").read_text())["steps_to_threshold"] == 1


def test_find_checkpoints_takes_globs_folders_and_run_folders_in_step_order(tmp_path):
    from lisa_control.core.errors import CheckpointError
    from lisa_control.eval.curves import find_checkpoints

    run = tmp_path / "run"
    for step in (10, 2, 100):
        (run / f"checkpoint-{step}" / "side_network").mkdir(parents=True)
        (run / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    (run / "checkpoint-7" / "side_network").mkdir(parents=True)  # being written: no state
    (run / "checkpoint-old").mkdir()
    expected = [(s, run / f"checkpoint-{s}" / "side_network") for s in (2, 10, 100)]
    for patterns in ([str(run / "checkpoint-*")], [str(run)],
                     [str(run / "checkpoint-100"), str(run / "checkpoint-[12]*")]):  # fmt: skip
        found = find_checkpoints(patterns)  # each checkpoint once, in step order
        assert [(s.step, s.path) for s in found] == [(s, p.resolve()) for s, p in expected]
    with pytest.raises(CheckpointError, match="matches no checkpoint-N folder"):
        find_checkpoints([str(tmp_path / "elsewhere" / "checkpoint-*")])
    with pytest.raises(CheckpointError, match="none is complete"):
        find_checkpoints([str(run / "checkpoint-7")])


def test_steps_to_threshold_is_the_first_step_that_reaches_it():
    from lisa_control.eval.curves import steps_to_threshold

    points = [(100, 0.2), (200, 0.5), (300, 0.4), (400, 0.7)]
    assert steps_to_threshold(points, 0.5) == 200
    assert steps_to_threshold(points, 0.6) == 400
    assert steps_to_threshold(points, 0.8) is None
    assert steps_to_threshold(points, None) is None
    assert steps_to_threshold(points, 0.3, higher_is_better=False) == 100
    assert steps_to_threshold([(1, 9.0), (2, 3.0)], 4.0, higher_is_better=False) == 2


# ----------------------------------------------------------------------------- extractors


def test_canny_finds_a_thin_outline_and_its_f1_mirrors_the_edges_task():
    from lisa_control.data.tasks.edges import edge_scores
    from lisa_control.eval.extractors import EdgeExtractor, canny, tolerant_edge_scores

    image = np.zeros((1, 24, 24, 3), np.uint8)
    image[0, 6:18, 6:18] = 255
    edges = canny(image)[0]
    assert edges.sum() > 0 and not edges[:4].any() and not edges[10:14, 10:14].any()
    assert edges[6:18, 4:8].any(axis=1).all()  # the left side is found along its whole length
    assert not canny(np.zeros((1, 8, 8, 3), np.uint8)).any()
    rng = np.random.default_rng(0)
    a, b = rng.random((3, 12, 12)) > 0.8, rng.random((3, 12, 12)) > 0.8
    for key, value in edge_scores(a, b).items():
        np.testing.assert_array_equal(tolerant_edge_scores(a, b, 1)[key], value)
    shifted = np.roll(a, 2, axis=-1)
    assert (
        tolerant_edge_scores(shifted, a, 0)["f1"].mean()
        < tolerant_edge_scores(shifted, a, 2)["f1"].mean()
    )
    extractor = EdgeExtractor()
    maps = extractor.extract(image)
    assert maps.shape == image.shape and maps.dtype == np.uint8
    assert extractor.compare(maps, maps)["edge_f1"].tolist() == [1.0]


def test_annotator_metrics_compare_maps():
    from lisa_control.eval.extractors import depth_mae, matched_region_iou, pose_iou

    a = np.zeros((1, 8, 8, 3), np.uint8)
    a[0, 2:6, 2:6] = (255, 0, 0)
    recoloured = a.copy()
    recoloured[0, 2:6, 2:6] = (0, 0, 255)
    assert matched_region_iou(recoloured, a).tolist() == [1.0]  # colours need not agree
    assert pose_iou(a, a).tolist() == [1.0] and pose_iou(np.zeros_like(a), a).tolist() == [0.0]
    ramp = np.repeat(np.linspace(0, 255, 8, dtype=np.uint8)[None, None, :, None], 8, 1).repeat(
        3, -1
    )
    assert depth_mae(ramp // 2, ramp).tolist() == pytest.approx([0.0], abs=0.01)  # scale-free
    assert depth_mae(255 - ramp, ramp)[0] > 0.4


def test_annotator_extractors_run_through_controlnet_aux(assets, tmp_path, monkeypatch):
    """The annotator plumbing with a stand-in controlnet_aux whose "MiDaS" returns the image's
    gray levels at twice the size: maps are brought back to the sample size and compared."""
    import types

    loaded = {}

    class FakeMidas:
        @classmethod
        def from_pretrained(cls, weights, **kwargs):
            loaded.update(weights=weights, **kwargs)
            return cls()

        def __call__(self, image):
            return image.convert("L").resize((2 * image.width, 2 * image.height))

    monkeypatch.setitem(sys.modules, "controlnet_aux", types.ModuleType("controlnet_aux"))
    sys.modules["controlnet_aux"].MidasDetector = FakeMidas
    data = make_image_folder(tmp_path / "data", n=3, size=RES)
    ramp = np.linspace(0, 255, RES)
    for k in range(3):  # smooth images; conditions: their own gray levels, as "depth"
        image = np.stack([np.add.outer(ramp, ramp * k / 3) / 2] * 3, -1).astype(np.uint8)
        Image.fromarray(image).save(data / f"img{k}.png")
        Image.fromarray(image).convert("L").save(data / f"cond{k}.png")
    out = tmp_path / "eval"
    argv = eval_argv(assets, out, "--controlnet", assets.controlnet, "--test_data_dir", data,
                     "--extractor", "depth", "--extractor_weights", tmp_path / "annotators",
                     "--no_frechet")  # fmt: skip
    assert main(argv) == 0
    assert loaded == {"weights": str(tmp_path / "annotators")}
    report = json.loads((out / "eval.json").read_text())
    assert report["metric"] == "depth_mae" and report["higher_is_better"] is False
    assert set(report["metrics"]) == {"depth_mae", "reference_depth_mae"}
    assert report["metrics"]["reference_depth_mae"] < 0.02  # resizing there and back
    assert 0 <= report["metrics"]["depth_mae"] <= 1
    assert report["settings"]["extractor_settings"] == {
        "weights": str(tmp_path / "annotators"),
        "annotator": "MidasDetector",
    }


# ----------------------------------------------------------------------------- bad input


@pytest.fixture
def without_controlnet_aux(monkeypatch):
    monkeypatch.setitem(sys.modules, "controlnet_aux", None)  # import fails as if not installed


def bad_eval_cases(assets, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir(exist_ok=True)
    data = make_image_folder(tmp_path / "data", n=2, size=RES)
    cn = ["--controlnet", str(assets.controlnet)]
    return {
        "missing folder": ([*cn, "--test_data_dir", str(tmp_path / "nope")], "does not exist"),
        "no test split": ([*cn, "--test_data_dir", str(empty)], "no usable test split"),
        "empty glob": (["--checkpoints", str(tmp_path / "run" / "checkpoint-*"), "--task", "pose"],
                       "matches no checkpoint-N folder"),
        "extractor missing": ([*cn, "--test_data_dir", str(data), "--extractor", "depth"],
                              "--extractor depth needs controlnet_aux: pip install controlnet_aux "
                              "(and its weights locally)"),
        "both splits": ([*cn, "--task", "pose", "--test_data_dir", str(data)], "not both"),
        "no side network": (["--task", "pose"], "pass one of --controlnet"),
        "missing controlnet": (["--controlnet", str(tmp_path / "nope"), "--task", "pose"],
                               "is not a folder"),
        "extractor on a task": ([*cn, "--task", "pose", "--extractor", "edges"],
                                "--extractor scores user data"),
        "zero steps": ([*cn, "--task", "pose", "--num_inference_steps", "0"],
                       "--num_inference_steps must be a whole number >= 1"),
        "inception without packages": ([*cn, "--task", "pose", "--inception_weights",
                                        str(data / "cond0.png")],
                                       "needs torchmetrics and torch-fidelity"),
    }  # fmt: skip


@pytest.mark.parametrize(
    "case",
    [
        "missing folder",
        "no test split",
        "empty glob",
        "extractor missing",
        "both splits",
        "no side network",
        "missing controlnet",
        "extractor on a task",
        "zero steps",
        "inception without packages",
    ],  # fmt: skip
)
def test_eval_refuses_bad_input_in_one_line(assets, tmp_path, capsys, monkeypatch, case,
                                            without_controlnet_aux):  # fmt: skip
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)
    extra, message = bad_eval_cases(assets, tmp_path)[case]
    out = tmp_path / "out"
    model = ["--pretrained_model_name_or_path", str(assets.model)]
    assert main(["eval", *model, *extra, "--output_dir", str(out), "--no-progress"]) == 2
    err = one_line_error(capsys)
    assert err.startswith("lisa eval: error: ") and message in err, err
    assert not (out / "eval.json").exists()

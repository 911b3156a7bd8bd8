"""`lisa eval` on composed side networks: several separately trained networks (`--controlnet A
B`, with scales and windows) and the networks of one joint run (`--checkpoints RUN`), scored on
the two-condition task (`pose_segmentation`) by each condition's metric.

Shown on a tiny pixel model: the composed scores are the task's metrics of the samples the
composition path draws with the same seed; `--each_alone` scores are single-network evals, and
the interference is their difference with the composed scores; a joint run's checkpoints give a
curve read back from curve.json; networks for another main network, and conditions that do not
match the networks, are refused in one line with an earlier eval.json left as it was.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from factories import make_pixel_model
from PIL import Image

from lisa_control.cli import main

RES = 16
TASK = "pose_segmentation"
CONDITIONS = 4
STEPS = 2


def perturb(module: torch.nn.Module, seed: int, amount: float = 0.05) -> torch.nn.Module:
    """Move every weight a little, so that the zero projections carry the network's residuals."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(amount * torch.randn(p.shape, generator=g))
    return module


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny pixel model for the two-condition task; a joint `lisa train` run (both conditions,
    checkpoints at steps 2 and 4); and a pose and a segmentation network trained apart, each in
    a run folder whose config.json is the joint run's with its own condition column (as `lisa
    train --conditioning_image_column pose` writes it)."""
    from lisa_control.families import UNetControlNetBranch
    from lisa_control.families.loading import load_main_model

    root = tmp_path_factory.mktemp("runs")
    model = make_pixel_model(root / "model", resolution=RES, task=TASK)
    joint = root / "joint"
    argv = ["train", "--pretrained_model_name_or_path", model, "--task", TASK,
            "--resolution", RES, "--train_batch_size", 2, "--max_train_steps", 4,
            "--checkpointing_steps", 2, "--validation_steps", 1000, "--learning_rate", 1e-2,
            "--regularizer", "none", "--report_to", "none", "--output_dir", joint,
            "--no-progress"]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    run_config = json.loads((joint / "config.json").read_text())
    unet = load_main_model(str(model)).main_network
    apart = {}
    for seed, name in enumerate(("pose", "segmentation"), start=1):
        folder = root / name
        torch.manual_seed(seed)
        branch = UNetControlNetBranch.from_main(unet, condition_downscale=1)
        perturb(branch.side_network, seed).save_pretrained(folder / "controlnet")
        config = {**run_config, "conditioning_image_column": name, "output_dir": str(folder)}
        (folder / "config.json").write_text(json.dumps(config))
        apart[name] = folder
    return SimpleNamespace(model=model, joint=joint, root=root, **apart)


def eval_config(out: Path, **settings):
    from lisa_control.eval.evaluate import EvalConfig

    values = dict(output_dir=str(out), num_conditions=CONDITIONS, num_inference_steps=STEPS,
                  batch_size=CONDITIONS, seed=3, frechet=False)  # fmt: skip
    return EvalConfig(**{**values, **settings})


def scores_of(report: dict) -> dict:
    return {k: v for k, v in report["metrics"].items() if not k.endswith("_interference")}


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err and "Traceback" not in err, err
    return err


CONTROLS = dict(conditioning_scale=[1.0, 0.8], control_guidance_start=[0.0, 0.5],
                control_guidance_end=[1.0, 1.0])  # fmt: skip


# ----------------------------------------------------------------------------- composed scores


def test_composed_scores_are_the_task_metrics_of_the_composed_samples(runs, tmp_path):
    """`lisa eval --controlnet POSE_RUN SEG_RUN` samples the task's held-out conditions with
    both networks composed (their scales and windows) and reports the task's metrics of those
    samples: the ones computed here on samples that the composition path (`lisa sample`'s
    sampler) draws with the same seed."""
    from lisa_control.data.tasks import get_task
    from lisa_control.eval.composition import condition_batch
    from lisa_control.eval.evaluate import evaluate
    from lisa_control.eval.generate import SideNetworkSampler
    from lisa_control.eval.validation import held_out_task_samples
    from lisa_control.families.loading import load_main_model

    both = [str(runs.pose), str(runs.segmentation)]
    report = evaluate(eval_config(tmp_path / "eval", controlnet=both, **CONTROLS))
    images = report.pop("images")
    assert report["data"]["task"] == TASK
    assert report["data"]["conditions"] == ["pose", "segmentation"]
    assert report["metric"] == "fidelity"
    assert [(n["name"], n["metric"], n["conditioning_scale"], n["control_guidance_start"])
            for n in report["composition"]] == [("pose", "pck", 1.0, 0.0),
                                                 ("segmentation", "miou", 0.8, 0.5)]  # fmt: skip
    assert report["composition"][0]["path"] == str(runs.pose / "controlnet")

    task = get_task(TASK, resolution=RES)
    samples = held_out_task_samples(task, CONDITIONS, 3)
    conditions = [condition_batch(samples, name) for name in ("pose", "segmentation")]
    sampler = SideNetworkSampler(
        load_main_model(str(runs.model)),
        [str(runs.pose / "controlnet"), str(runs.segmentation / "controlnet")],
        num_inference_steps=STEPS, device="cpu", **CONTROLS,
    )  # fmt: skip
    drawn = sampler(conditions, [s.caption for s in samples], seed=3, batch_size=CONDITIONS)
    assert torch.equal(drawn, images)
    expected = task.fidelity(drawn, samples)
    assert report["metrics"] == expected
    assert {"pck", "miou", "fidelity"} <= set(expected)
    assert expected["fidelity"] == pytest.approx((expected["pck"] + expected["miou"]) / 2)
    per_condition = [row["pck"] for row in report["per_condition"]]
    assert np.mean(per_condition) == pytest.approx(expected["pck"])
    # The composition is not either network alone.
    pose_alone = SideNetworkSampler(load_main_model(str(runs.model)),
                                    str(runs.pose / "controlnet"), num_inference_steps=STEPS,
                                    device="cpu")  # fmt: skip
    alone = pose_alone(conditions[0], [s.caption for s in samples], seed=3, batch_size=CONDITIONS)
    assert not torch.allclose(alone, images, atol=1e-3)


# ----------------------------------------------------------------------------- each alone


@pytest.mark.parametrize("controls", [CONTROLS, {}], ids=["scales_and_windows", "defaults"])
def test_each_alone_scores_equal_single_network_evals_and_interference_is_their_gap(
    runs, tmp_path, controls
):
    """With `--each_alone` every network is also sampled alone, its scale and window kept: the
    scores equal `lisa eval` of that network by itself with its flags (none: a plain side
    network); a network's interference is its condition's metric alone minus composed (pose:
    PCK, segmentation: mIoU)."""
    from lisa_control.eval.evaluate import evaluate

    both = [str(runs.pose), str(runs.segmentation)]
    report = evaluate(eval_config(tmp_path / "both", controlnet=both, each_alone=True, **controls))
    composed = scores_of(report)
    assert set(report["alone"]) == {"pose", "segmentation"}
    for k, name in enumerate(("pose", "segmentation")):
        flags = {key: values[k] for key, values in controls.items()}
        single = evaluate(eval_config(tmp_path / name, controlnet=both[k], task=TASK, **flags))
        assert single["metric"] == {"pose": "pck", "segmentation": "miou"}[name]
        assert report["alone"][name] == single["metrics"]
    alone = report["alone"]
    assert report["metrics"]["pose_interference"] == alone["pose"]["pck"] - composed["pck"]
    assert report["metrics"]["segmentation_interference"] == (
        alone["segmentation"]["miou"] - composed["miou"]
    )
    # The sheet: pose | segmentation | composed | pose alone | segmentation alone | truth.
    sheet = np.asarray(Image.open(tmp_path / "both" / "samples.png"))
    assert sheet.shape == (2 + CONDITIONS * (RES + 2), 2 + 6 * (RES + 2), 3)


# ----------------------------------------------------------------------------- a joint run


def test_a_joint_run_is_scored_checkpoint_by_checkpoint_and_its_curve_read_back(runs, tmp_path):
    """`lisa eval --checkpoints RUN --each_alone` on a run that trained both networks: every
    checkpoint's networks composed (and each alone), the curve of the interference over the
    steps in curve.json; `--controlnet RUN` (its saved networks) scores as its last checkpoint."""
    out = tmp_path / "series"
    argv = ["eval", "--checkpoints", runs.joint, "--each_alone", "--num_conditions", CONDITIONS,
            "--num_inference_steps", STEPS, "--batch_size", CONDITIONS, "--seed", 3,
            "--no_frechet", "--curve_metric", "pose_interference", "--threshold", 0.0,
            "--output_dir", out, "--no-progress"]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["data"]["task"] == TASK
    assert report["data"]["conditions"] == ["pose", "segmentation"]
    assert [n["name"] for n in report["composition"]] == ["pose", "segmentation"]
    checkpoints = report["checkpoints"]
    assert [c["step"] for c in checkpoints] == [2, 4]
    for c in checkpoints:
        side = runs.joint / f"checkpoint-{c['step']}" / "side_network"
        assert c["paths"] == {n: str((side / n).resolve()) for n in ("pose", "segmentation")}
        assert set(c["alone"]) == {"pose", "segmentation"}
        assert c["metrics"]["pose_interference"] == (
            c["alone"]["pose"]["pck"] - c["metrics"]["pck"]
        )
        assert c["metrics"]["segmentation_interference"] == (
            c["alone"]["segmentation"]["miou"] - c["metrics"]["miou"]
        )
        assert (out / f"samples-step-{c['step']}.png").is_file()
    assert report["metrics"] == checkpoints[-1]["metrics"]
    assert report["alone"] == checkpoints[-1]["alone"]
    curve = json.loads((out / "curve.json").read_text())
    assert curve["metric"] == "pose_interference" and curve["higher_is_better"] is False
    assert curve["steps"] == [2, 4]
    assert curve["values"] == [c["metrics"]["pose_interference"] for c in checkpoints]
    assert [p["fidelity"] for p in curve["points"]] == [c["metrics"]["fidelity"]
                                                       for c in checkpoints]  # fmt: skip
    reached = [c["step"] for c in checkpoints if c["metrics"]["pose_interference"] <= 0.0]
    assert curve["steps_to_threshold"] == (reached[0] if reached else None)
    assert (out / "curve.png").stat().st_size > 1000

    final = tmp_path / "final"
    argv = ["eval", "--controlnet", runs.joint, "--num_conditions", CONDITIONS,
            "--num_inference_steps", STEPS, "--batch_size", CONDITIONS, "--seed", 3,
            "--no_frechet", "--output_dir", final, "--no-progress"]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    saved = json.loads((final / "eval.json").read_text())
    expected = {k: v for k, v in report["metrics"].items() if not k.endswith("_interference")}
    assert saved["metrics"] == expected and "alone" not in saved


# ----------------------------------------------------------------------------- refusals


def refusal_cases(runs, tmp_path) -> dict:
    """case -> (argv after `lisa eval`, words of the one-line error)."""
    from diffusers import UNet2DConditionModel

    from lisa_control.families import UNetControlNetBranch
    from lisa_control.zoo.unet import tiny_unet

    pose, seg = str(runs.pose), str(runs.segmentation)
    other = tmp_path / "other_seg"  # the segmentation run, on another main network folder
    make_pixel_model(tmp_path / "other_model", resolution=RES, task=TASK)
    (other / "controlnet").mkdir(parents=True)
    for f in (runs.segmentation / "controlnet").iterdir():
        (other / "controlnet" / f.name).write_bytes(f.read_bytes())
    config = json.loads((runs.segmentation / "config.json").read_text())
    config["pretrained_model_name_or_path"] = str(tmp_path / "other_model")
    (other / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        **tiny_unet(
            sample_size=RES, block_out_channels=(8, 16), cross_attention_dim=16, layers_per_block=1
        )
    )
    foreign = tmp_path / "foreign"  # a bare ControlNet built for another UNet
    UNetControlNetBranch.from_main(unet, condition_downscale=1).save_side_network(foreign)
    data = tmp_path / "data"
    data.mkdir()
    return {
        "other main network": ([pose, str(other)], "trained on different main networks"),
        "foreign network": ([pose, str(foreign)],
                            f"side network {foreign} was not built for the main network"),
        "one-condition task": ([pose, seg, "--task", "pose"],
                               "task 'pose' renders one condition but 2 side networks"),
        "order": ([pose, seg, "--conditioning_image_column", "segmentation", "pose"],
                  "was trained on 'pose' but --conditioning_image_column gives it "
                  "'segmentation'"),
        "count": ([pose, seg, "--conditioning_image_column", "pose"],
                  "names 1 condition(s) (pose) for 2 side network(s)"),
        "three networks": ([pose, seg, str(foreign)],
                           "renders 2 conditions (pose, segmentation) but 3 side networks"),
        "unknown condition": ([str(foreign), "--pretrained_model_name_or_path", runs.model,
                               "--task", TASK],
                              "but the 1 side network(s) take ? (?: not known); name the "
                              "condition each takes with --conditioning_image_column"),
        "not rendered": ([pose, str(foreign), "--conditioning_image_column", "pose", "depth"],
                         "renders the conditions pose, segmentation, not depth"),
        "twice": ([pose, pose], "two side networks take the same condition"),
        "alone needs several": ([pose, "--each_alone"], "--each_alone scores each of several"),
        "scales": ([pose, seg, "--conditioning_scale", 1, 1, 1],
                   "--conditioning_scale has 3 values for 2"),
        "window": ([pose, seg, "--control_guidance_start", 0.5, "--control_guidance_end", 0.5],
                   "must satisfy 0 <= start < end <= 1"),
        "test folder": ([pose, seg, "--test_data_dir", str(data)],
                        "2 side networks are composed, but a --test_data_dir split"),
    }  # fmt: skip


CASES = ["other main network", "foreign network", "one-condition task", "order", "count",
         "three networks", "unknown condition", "not rendered", "twice", "alone needs several",
         "scales", "window", "test folder"]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_mismatched_compositions_are_refused_in_one_line_and_nothing_written_is_lost(
    runs, tmp_path, capsys, case
):
    extra, words = refusal_cases(runs, tmp_path)[case]
    out = tmp_path / "out"
    out.mkdir()
    (out / "eval.json").write_text('{"an": "earlier evaluation"}')
    argv = ["eval", "--controlnet", *map(str, extra), "--num_inference_steps", 1,
            "--output_dir", out, "--no-progress"]  # fmt: skip
    assert main([str(a) for a in argv]) == 2
    err = one_line_error(capsys)
    assert err.startswith("lisa eval: error: ") and words in err, err
    assert sorted(p.name for p in out.iterdir()) == ["eval.json"]
    assert (out / "eval.json").read_text() == '{"an": "earlier evaluation"}'

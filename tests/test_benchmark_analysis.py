"""The benchmarks' arithmetic: steps-to-level, interpolated speed-up and mean gain on curves
made up by hand, the LayerSync comparison over the steps both runs made, and the held-out loss
of the main-network benchmark with predictions whose error is known."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import convergence  # noqa: E402
import layersync_pretrain  # noqa: E402
import shipped_realism  # noqa: E402
from factories import make_pixel_model  # noqa: E402

from lisa_control.data.tasks import get_task  # noqa: E402
from lisa_control.families.loading import load_main_model  # noqa: E402


def run(seed, values, every=100):
    return {"seed": seed, "curve": [((i + 1) * every, v) for i, v in enumerate(values)]}


def test_interpolated_reach_is_linear_between_evaluations():
    curve = [(100, 0.2), (200, 0.4), (300, 0.8)]
    assert convergence.interpolated_reach(curve, 0.6) == pytest.approx(250)
    assert convergence.interpolated_reach(curve, 0.1) == 100
    assert convergence.interpolated_reach(curve, 0.9) is None


def test_a_curve_twice_as_fast_gives_speedup_two():
    plain = run(0, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    fast = run(0, [0.2, 0.4, 0.6, 0.8, 0.8, 0.8, 0.8, 0.8])
    result = convergence.compare_to_plain(plain, fast)
    assert result["speedup_interpolated"] == pytest.approx(2.0)
    assert result["mean_gain"] == pytest.approx(
        sum(f - p for (_, f), (_, p) in zip(fast["curve"], plain["curve"])) / 8
    )
    # plain's own final level (mean of its last 3 evals, 0.7) is reached by its running mean
    # of three at step 800; the fast run's running mean, (0.6 + 0.8 + 0.8) / 3, at step 500:
    # the smoothing lags a sharp rise, so this ratio understates a true 2x.
    assert (result["plain_steps"], result["variant_steps"]) == (800, 500)
    assert result["speedup"] == pytest.approx(1.6)


def test_time_to_plain_final_in_seconds_uses_each_runs_step_time():
    plain = run(0, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]) | {"seconds_per_step": 0.5}
    fast = run(0, [0.2, 0.4, 0.6, 0.8, 0.8, 0.8, 0.8, 0.8]) | {"seconds_per_step": 1.0}
    result = convergence.compare_to_plain(plain, fast)
    # 800 steps at 0.5 s against 500 steps at 1.0 s: fewer steps, yet slower on the clock.
    assert (result["plain_seconds"], result["variant_seconds"]) == (400.0, 500.0)
    assert result["speedup_seconds"] == pytest.approx(0.8)
    assert result["speedup_interpolated_seconds"] == pytest.approx(2.0 * 0.5)
    untimed = convergence.compare_to_plain(run(0, [0.1, 0.2, 0.3]), fast)  # no step times
    assert untimed["plain_seconds"] is None and untimed["speedup_seconds"] is None


def test_identical_curves_give_one_and_runs_compare_on_common_steps():
    plain = run(0, [0.1, 0.3, 0.5, 0.6, 0.65])
    same_but_shorter = run(0, [0.1, 0.3, 0.5])
    result = convergence.compare_to_plain(plain, same_but_shorter)
    assert result["steps_compared"] == 300
    assert result["speedup_interpolated"] == pytest.approx(1.0)
    assert result["mean_gain"] == 0
    assert convergence.compare_to_plain(plain, run(0, [0.1, 0.3])) is None


def test_step_time_is_the_median_of_the_loss_log_ignoring_validation_steps():
    # Step 3 ran a validation: one slow step must not move the per-step figure.
    losses = [{"step": i, "step_seconds": t} for i, t in enumerate([0.1, 0.1, 9.0, 0.1, 0.12], 1)]
    assert convergence.median_step_seconds(losses) == pytest.approx(0.1)
    assert convergence.median_step_seconds([{"step": 1}]) is None


@pytest.mark.parametrize("variant", sorted(convergence.VARIANTS))
def test_every_ablation_variant_is_a_valid_train_command(variant, tmp_path):
    from lisa_control.training.config import parse_args

    args = convergence.build_parser().parse_args(["--run_dir", str(tmp_path)])
    cfg = parse_args(convergence.run_flags(args, "pose", variant, seed=0))
    expected = convergence.VARIANTS[variant]
    assert cfg.regularizer == expected["regularizer"]
    assert cfg.lisa_weight == expected.get("lisa_weight", 0.2)
    assert cfg.lisa_layer == expected.get("lisa_layer")


def test_layersync_comparison_uses_shared_steps_and_direction():
    base = [(250, 400.0), (500, 300.0), (750, 200.0), (800, 190.0)]
    other = [(250, 300.0), (500, 200.0), (700, 150.0)]
    result = layersync_pretrain.compare(base, other, lower_is_better=True)
    # common steps 250 and 500: baseline final = (400 + 300) / 2 = 350, reached at 500;
    # the other run is at 300 <= 350 already at step 250.
    assert result["steps_compared"] == 500
    assert (result["baseline_steps"], result["layersync_steps"]) == (500, 250)
    assert result["speedup"] == pytest.approx(2.0)
    higher = layersync_pretrain.compare([(1, 0.1), (2, 0.3)], [(1, 0.05), (2, 0.1)], False)
    assert higher["layersync_steps"] is None and higher["speedup"] is None


def test_ddp_scaling_script_runs_two_cpu_processes(tmp_path):
    """The 2-GPU scaling benchmark, as a gloo smoke run on the CPU: both launches train, and
    the reported scaling is the ratio of the measured throughputs."""
    import json

    import ddp_scaling

    out = tmp_path / "scaling.json"
    ddp_scaling.main(["--cpu", "--processes", "2", "--resolution", "16", "--block_out_channels",
                      "32", "32", "--train_batch_size", "2", "--steps", "3", "--warmup", "1",
                      "--run_dir", str(tmp_path / "runs"), "--out", str(out)])  # fmt: skip
    result = json.loads(out.read_text())
    one, two = result["runs"]["1"], result["runs"]["2"]
    assert one["steps"] == two["steps"] == 3
    expected = two["samples_per_second"] / (2 * one["samples_per_second"])
    assert result["scaling"] == pytest.approx(expected)
    assert result["command"].startswith("python benchmarks/ddp_scaling.py --cpu")


def test_held_out_loss_scores_known_predictions_per_noise_band(tmp_path, monkeypatch):
    model = load_main_model(str(make_pixel_model(tmp_path / "main", resolution=16)))
    task = get_task("pose", resolution=16)
    # Predicting zero leaves the whole eps target: mean eps^2 = 1 in every band.
    monkeypatch.setattr(shipped_realism, "predict", lambda net, x, t, ctx: torch.zeros_like(x))
    zero = shipped_realism.held_out_loss(model, task, count=64, device="cpu")
    for band in ("all_t", "t_below_half", "t_above_half"):
        assert zero[band] == pytest.approx(1.0, abs=0.05)
    # Predicting x_t itself misses by alpha_t x0 + (sigma_t - 1) eps: nearly nothing above
    # t = 500, where alpha_t^2 < 0.08 on this schedule, and up to |x0 - eps| near t = 0.
    monkeypatch.setattr(shipped_realism, "predict", lambda net, x, t, ctx: x)
    noisy = shipped_realism.held_out_loss(model, task, count=64, device="cpu")
    assert noisy["t_above_half"] < 0.1 < 0.3 < noisy["t_below_half"]
    assert noisy["all_t"] == pytest.approx((noisy["t_above_half"] + noisy["t_below_half"]) / 2)

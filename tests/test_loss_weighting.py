"""Noise-level weightings of the diffusion loss equal their formulas for eps, v and flow."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

from lisa_control.core.errors import ConfigError
from lisa_control.core.objectives import make_objective
from lisa_control.core.weighting import MinSNRWeighting, X0Weighting, make_weighting


def _batch(objective, t):
    torch.manual_seed(0)
    x0 = torch.randn(len(t), 3, 4, 4)
    batch = objective.sample(x0, timesteps=torch.tensor(t))
    prediction = batch.target + 0.1 * torch.randn_like(batch.target)
    return x0, batch, prediction


def _alpha_sigma(t):
    abar = DDPMScheduler().alphas_cumprod[torch.tensor(t)].double()
    return abar.sqrt(), (1 - abar).sqrt()


def _per_sample_mse(prediction, target):
    return (prediction.double() - target.double()).pow(2).flatten(1).mean(1)


@pytest.mark.parametrize("name", ["epsilon", "v_prediction"])
def test_x0_weighting_is_the_x0_error_for_diffusion_objectives(name):
    t = [10, 300, 700]
    objective = make_objective(name, weighting=X0Weighting(max_weight=1e9))
    x0, batch, prediction = _batch(objective, t)
    alpha, sigma = _alpha_sigma(t)
    # By hand: the clean sample each prediction implies, and its squared error.
    x_t = batch.x_t.double()
    if name == "epsilon":
        x0_hat = (x_t - sigma[:, None, None, None] * prediction.double()) / alpha[:, None, None, None]
        j = sigma / alpha
    else:
        x0_hat = alpha[:, None, None, None] * x_t - sigma[:, None, None, None] * prediction.double()
        j = sigma
    expected = (x0_hat - x0.double()).pow(2).flatten(1).mean(1).mean()
    assert objective.loss(prediction, batch).item() == pytest.approx(expected.item(), rel=1e-4)
    weighted = (j**2 * _per_sample_mse(prediction, batch.target)).mean()
    assert objective.loss(prediction, batch).item() == pytest.approx(weighted.item(), rel=1e-5)


def test_x0_weighting_is_the_x0_error_for_flow():
    s = [0.05, 0.5, 0.95]
    objective = make_objective("flow", weighting=X0Weighting(max_weight=1e9))
    x0, batch, prediction = _batch(objective, [1000 * v for v in s])
    x0_hat = batch.x_t.double() - torch.tensor(s, dtype=torch.float64)[:, None, None, None] * (
        prediction.double()
    )
    expected = (x0_hat - x0.double()).pow(2).flatten(1).mean(1).mean()
    assert objective.loss(prediction, batch).item() == pytest.approx(expected.item(), rel=1e-4)


def test_the_x0_weight_is_capped_near_t_max_and_stays_finite():
    objective = make_objective("epsilon", weighting=X0Weighting(max_weight=5.0))
    t = torch.tensor([0, 500, 990, 999])
    weights = objective.weighting(objective, t, torch.zeros(4, 3, 2, 2)).flatten()
    alpha, sigma = _alpha_sigma(t.tolist())
    expected = torch.minimum((sigma / alpha) ** 2, torch.tensor(5.0, dtype=torch.float64))
    assert torch.allclose(weights.double(), expected, rtol=1e-5)
    assert weights[-1] == 5.0 and weights[0] < 1e-3
    x0, batch, prediction = _batch(objective, t.tolist())
    assert math.isfinite(objective.loss(prediction, batch).item())


@pytest.mark.parametrize("name", ["epsilon", "v_prediction"])
def test_min_snr_matches_diffusers_formula(name):
    gamma = 5.0
    t = [1, 100, 400, 800, 999]
    objective = make_objective(name, weighting=MinSNRWeighting(gamma))
    _, batch, prediction = _batch(objective, t)
    alpha, sigma = _alpha_sigma(t)
    snr = alpha**2 / sigma**2
    # diffusers' train scripts: mse_loss_weights = min(snr, gamma) / snr (eps), / (snr + 1) (v)
    clipped = torch.minimum(snr, torch.tensor(gamma, dtype=torch.float64))
    weights = clipped / snr if name == "epsilon" else clipped / (snr + 1)
    expected = (weights * _per_sample_mse(prediction, batch.target)).mean()
    assert objective.loss(prediction, batch).item() == pytest.approx(expected.item(), rel=1e-4)


def test_min_snr_for_flow_weights_the_velocity_error_by_min_snr_times_s_squared():
    gamma, s = 5.0, torch.tensor([0.1, 0.3, 0.9], dtype=torch.float64)
    objective = make_objective("flow", weighting=MinSNRWeighting(gamma))
    _, batch, prediction = _batch(objective, (1000 * s).tolist())
    snr = ((1 - s) / s) ** 2
    weights = torch.minimum(snr, torch.tensor(gamma, dtype=torch.float64)) * s**2
    expected = (weights * _per_sample_mse(prediction, batch.target)).mean()
    assert objective.loss(prediction, batch).item() == pytest.approx(expected.item(), rel=1e-4)


def test_no_weighting_is_the_plain_mean_squared_error():
    objective = make_objective("epsilon", weighting=make_weighting("none"))
    _, batch, prediction = _batch(objective, [3, 500])
    plain = torch.nn.functional.mse_loss(prediction, batch.target)
    assert objective.loss(prediction, batch).item() == plain.item()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(name="x1"), "unknown loss weighting 'x1'"),
        (dict(name="min_snr", snr_gamma=0), "gamma"),
        (dict(name="x0", x0_weight_max=float("nan")), "x0 weight cap"),
    ],
)
def test_bad_weighting_settings_are_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        make_weighting(**kwargs)


def test_latent_flow_recipes_refuse_a_second_weighting():
    from lisa_control.families import get_family
    from lisa_control.families.base import MainModel

    model = MainModel(main_network=None, scheduler=None, family=get_family("sd3"), vae=object())
    with pytest.raises(ConfigError, match="diffusers' weighting scheme"):
        model.training_objective("flow", weighting=X0Weighting())


def test_training_runs_with_each_weighting_and_resume_refuses_another(tmp_path, capsys):
    from factories import make_image_folder, make_pixel_model

    from lisa_control.cli import main

    model, data = make_pixel_model(tmp_path / "model"), make_image_folder(tmp_path / "data", n=4)

    def argv(out, steps, *extra):
        flags = dict(pretrained_model_name_or_path=model, train_data_dir=data, resolution=16,
                     train_batch_size=2, max_train_steps=steps, checkpointing_steps=1,
                     validation_steps=0, report_to="none", output_dir=out)
        return ["train", *[a for k, v in flags.items() for a in (f"--{k}", str(v))],
                "--no-progress", *extra]

    import json

    losses = {}
    for name in ("none", "x0", "min_snr"):
        out = tmp_path / name
        assert main(argv(out, 1, "--loss_weighting", name)) == 0
        losses[name] = json.loads((out / "loss_log.jsonl").read_text().splitlines()[0])["loss"]
    # Same data, weights and noise: only the weighting differs, and it changes the loss.
    assert len(set(losses.values())) == 3
    capsys.readouterr()
    code = main(argv(tmp_path / "none", 2, "--loss_weighting", "x0",
                     "--resume_from_checkpoint", "latest"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "loss_weighting" in err[0] and "'none'" in err[0]


def test_the_default_weighting_is_x0_where_the_objective_takes_one():
    from lisa_control.families import get_family
    from lisa_control.families.base import MainModel

    sd3 = MainModel(main_network=None, scheduler=None, family=get_family("sd3"), vae=object())
    assert sd3.default_loss_weighting("flow") == "none"  # latent flow: diffusers' scheme alone
    for name in ("flux", "wan_vace"):
        latent = MainModel(main_network=None, scheduler=None, family=get_family(name), vae=object())
        assert latent.default_loss_weighting("flow") == "none"
    pixel_sd3 = MainModel(main_network=None, scheduler=None, family=get_family("sd3"), vae=None)
    assert pixel_sd3.default_loss_weighting("flow") == "x0"
    unet = MainModel(main_network=None, scheduler=None, family=get_family("unet"), vae=None)
    assert unet.default_loss_weighting("epsilon") == "x0"
    assert unet.default_loss_weighting("v_prediction") == "x0"


def test_a_run_records_the_weighting_it_resolved_and_resume_keeps_the_checkpoints(tmp_path):
    """Without --loss_weighting a run trains with x0 and records it; resuming with the same
    command continues; a checkpoint that records no weighting (written before it was a setting)
    resumes with none, the loss it was trained with, unless another is named."""
    import json

    from factories import make_image_folder, make_pixel_model

    from lisa_control.cli import main

    model, data = make_pixel_model(tmp_path / "model"), make_image_folder(tmp_path / "data", n=4)
    out = tmp_path / "run"

    def argv(steps, *extra):
        flags = dict(pretrained_model_name_or_path=model, train_data_dir=data, resolution=16,
                     train_batch_size=2, max_train_steps=steps, checkpointing_steps=1,
                     validation_steps=0, report_to="none", output_dir=out,
                     resume_from_checkpoint="latest")
        return ["train", *[a for k, v in flags.items() for a in (f"--{k}", str(v))],
                "--no-progress", *extra]

    def weighting_of(step):
        state = json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())
        return state["fingerprint"]["loss_weighting"]

    assert main(argv(1)) == 0
    assert weighting_of(1) == "x0"
    assert json.loads((out / "config.json").read_text())["loss_weighting"] == "x0"
    assert main(argv(2)) == 0
    assert weighting_of(2) == "x0"

    state_file = out / "checkpoint-2" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["fingerprint"]["loss_weighting"]
    state_file.write_text(json.dumps(state))
    assert main(argv(3, "--loss_weighting", "x0")) == 2  # it ran with none: x0 is refused
    assert main(argv(3)) == 0
    assert weighting_of(3) == "none"
    assert json.loads((out / "config.json").read_text())["loss_weighting"] == "none"
    steps = [json.loads(x)["step"] for x in (out / "loss_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]

"""LISA's options beyond the paper's recipe, each against its formula: the residual in x0 space
or as a score, and a decaying lambda. These exist for the convergence benchmark's ablations;
the default stays the paper's residual with a constant lambda 0.2."""

from __future__ import annotations

import pytest
import torch
from diffusers import ControlNetModel, DDPMScheduler, UNet2DConditionModel

from lisa_control import ConfigError, LikelihoodScoreAlignment, make_objective
from lisa_control.core.branch import Prediction
from lisa_control.zoo.unet import tiny_unet
from lisa_control.regularizers.base import StepState

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def side_network():
    unet = UNet2DConditionModel(**tiny_unet(sample_size=16, in_channels=4))
    return ControlNetModel.from_unet(unet)


def lisa(side_network, **kwargs):
    return LikelihoodScoreAlignment(side_network, out_channels=4, sample_size=16, **kwargs)


def step_state(objective, seed=0, step=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(3, 4, 16, 16, generator=g)
    noised = objective.sample(x0, generator=g, timesteps=torch.tensor([20, 500, 980]))
    prior = torch.randn(x0.shape, generator=g)
    return StepState(noised, Prediction(output=prior, prior=prior), objective, step=step)


def scales(objective, noised):
    """(x0 scale, score scale) with which each space maps a prediction difference."""
    t = noised.timesteps
    if objective.prediction_type == "flow":
        s = (t.float() / 1000).view(-1, 1, 1, 1)
        return -s, -(1 - s) / s  # x0 = x_s - s u;  score = -(x_s + (1 - s) u) / s
    abar = DDPMScheduler(num_train_timesteps=1000).alphas_cumprod[t].view(-1, 1, 1, 1)
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    if objective.prediction_type == "epsilon":
        return -sigma / alpha, -1 / sigma  # x0 = (x_t - sigma eps) / alpha;  score = -eps / sigma
    return -sigma, -alpha / sigma  # v: x0 = alpha x_t - sigma v;  eps = sigma x_t + alpha v


@pytest.mark.parametrize("name", ["epsilon", "v_prediction", "flow"])
def test_x0_and_score_targets_are_the_rescaled_residual(side_network, name):
    scheduler = None if name == "flow" else DDPMScheduler(num_train_timesteps=1000)
    objective = make_objective(name, scheduler)
    state = step_state(objective)
    residual = state.noised.target - state.prediction.prior
    x0_scale, score_scale = scales(objective, state.noised)
    paper = lisa(side_network).aux_target(state)
    assert torch.allclose(paper, residual)
    got_x0 = lisa(side_network, target="x0").aux_target(state)
    assert torch.allclose(got_x0, x0_scale * residual, rtol=1e-4, atol=1e-5)
    got_score = lisa(side_network, target="score").aux_target(state)
    assert torch.allclose(got_score, score_scale * residual, rtol=1e-4, atol=1e-4)


def test_decaying_weight_follows_its_schedule_and_scales_the_loss(side_network):
    reg = lisa(side_network, weight=5.0, final_weight=0.2, weight_decay_steps=100)
    assert [reg.weight_at(s) for s in (0, 50, 100, 1000)] == pytest.approx([5.0, 2.6, 0.2, 0.2])
    assert lisa(side_network).weight_at(10_000) == 0.2  # the paper's constant lambda
    objective = make_objective("epsilon", DDPMScheduler(num_train_timesteps=1000))
    with torch.no_grad():
        reg.decoder.out.weight.normal_(0, 0.1)  # off zero, so the aux loss is not constant
    outputs = []
    for step in (0, 100):
        state = step_state(objective, step=step)
        side_network(  # fills LISA's hook with the feature it reads
            state.noised.x_t, state.noised.timesteps, torch.zeros(3, 1, 32),
            torch.rand(3, 3, 128, 128), return_dict=False,
        )  # fmt: skip
        outputs.append(reg.loss(state))
    for out, weight in zip(outputs, (5.0, 0.2)):
        assert out.logs["aux_weight"] == pytest.approx(weight)
        assert out.loss.item() == pytest.approx(weight * out.logs["aux_loss"].item(), rel=1e-5)


def test_bad_variant_settings_are_config_errors(side_network):
    with pytest.raises(ConfigError, match="residual, x0, score"):
        lisa(side_network, target="eps")
    with pytest.raises(ConfigError, match="lisa_weight_decay_steps"):
        lisa(side_network, final_weight=0.2)
    with pytest.raises(ConfigError, match="final weight must be a finite number"):
        lisa(side_network, final_weight=float("nan"), weight_decay_steps=10)

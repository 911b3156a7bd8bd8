"""LISA on part of the batch (``batch_fraction``, ``subset``): the prior, the decoder and the aux
loss on a subset S of the rows, the loss written out here by hand on S,

    L = MSE(y_full, y) + lambda * (1 / |S|) sum_{i in S} mean((D(h_i, t_i) - (y_i - y_main,i))^2),

with its gradients; every branch's prior on some rows equal to those rows of its full prior;
the timestep subset; the union of several regularizers' rows; the random draw under a seed.
Tiny models built in code; CPU only.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel

from lisa_control import (
    ConfigError,
    Context,
    ControlTrainingStep,
    LikelihoodScoreAlignment,
    UNetControlNetBranch,
    make_objective,
)
from lisa_control.core.branch import Prediction, union_rows
from lisa_control.core.hooks import resolve_layer
from lisa_control.families.flux import FluxControlNetBranch
from lisa_control.families.sd3 import SD3ControlNetBranch
from lisa_control.families.t2i_adapter import T2IAdapterBranch
from lisa_control.regularizers.lisa import subset_size
from lisa_control.zoo.flow import tiny_flux_transformer, tiny_sd3_controlnet, tiny_sd3_transformer
from lisa_control.zoo.unet import tiny_unet

# diffusers' own FluxControlNetModel still imports the deprecated FluxPosEmbed.
pytestmark = pytest.mark.filterwarnings("ignore:.*FluxPosEmbed.*:FutureWarning")

SIZE = 16
BATCH = 8
TEXT_DIM = 32
WEIGHT = 0.2
LATENT = 8  # the transformer and adapter branches' latent side
CONTEXT_DIM, POOLED_DIM = 16, 8
TIMESTEPS = torch.tensor([37, 801, 500, 12, 999, 250, 640, 499])


# ----------------------------------------------------------------------------- builders


def randomize_zero_parameters(module: torch.nn.Module, seed: int = 0) -> None:
    """Small random values for every all-zero parameter (zero projections, the decoder's zero
    head), so that every path carries gradient and the comparisons mean something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def unet_branch(**flags) -> UNetControlNetBranch:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        **tiny_unet(
            sample_size=SIZE, in_channels=4, block_out_channels=(16, 32, 32), layers_per_block=1
        )
    ).eval()
    branch = UNetControlNetBranch.from_main(unet, condition_downscale=1, **flags)
    randomize_zero_parameters(branch.side_network, seed=1)
    return branch


def lisa(branch, **kwargs) -> LikelihoodScoreAlignment:
    reg = LikelihoodScoreAlignment(
        branch.side_network, layer="down_5", out_channels=4, sample_size=SIZE, **kwargs
    )
    randomize_zero_parameters(reg.decoder, seed=2)
    return reg


def twin(branch, source: LikelihoodScoreAlignment, **kwargs) -> LikelihoodScoreAlignment:
    """Another LISA on ``branch`` whose decoder starts with ``source``'s weights."""
    reg = lisa(branch, **kwargs)
    reg.decoder.load_state_dict(source.decoder.state_dict())
    return reg


def unet_inputs(batch: int = BATCH, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, 4, SIZE, SIZE, generator=g)
    context = Context(torch.randn(batch, 7, TEXT_DIM, generator=g))
    condition = torch.rand(batch, 3, SIZE, SIZE, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    return x0, context, condition, noise, TIMESTEPS[:batch].clone()


def grads(loss, params):
    return torch.autograd.grad(loss, params, allow_unused=True)


def assert_grads_close(got, expected, names):
    for name, a, b in zip(names, got, expected):
        if a is None or b is None:
            assert a is None and b is None, name
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)


def trainable(step: ControlTrainingStep, reg: LikelihoodScoreAlignment):
    named = [
        *step.branch.side_network.named_parameters(),
        *((f"decoder.{n}", p) for n, p in reg.decoder.named_parameters()),
    ]
    names, params = zip(*named)
    return list(names), list(params)


def hand_written_loss(branch, decoder, x0, context, condition, noise, t, rows):
    """The step's loss with raw diffusers calls and a hook of our own, the aux term on ``rows``."""
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    unet, controlnet = branch.main_network, branch.side_network
    x_t = scheduler.add_noise(x0, noise, t)
    text = context.encoder_hidden_states
    captured = []
    handle = resolve_layer(controlnet, "down_5").module.register_forward_pre_hook(
        lambda module, args: captured.append(args[0])
    )
    try:
        down, mid = controlnet(
            x_t, t, encoder_hidden_states=text, controlnet_cond=condition, return_dict=False
        )
    finally:
        handle.remove()
    y_full = unet(
        x_t,
        t,
        encoder_hidden_states=text,
        down_block_additional_residuals=down,
        mid_block_additional_residual=mid,
    ).sample
    with torch.no_grad():
        y_main = unet(x_t, t, encoder_hidden_states=text).sample
    (h,) = captured
    decoded = decoder(h[rows], t[rows])
    aux = ((decoded - (noise - y_main)[rows]) ** 2).flatten(1).mean(1).mean()
    return F.mse_loss(y_full, noise) + WEIGHT * aux, aux


def expected_rows(subset: str, fraction: float, seed: int) -> torch.Tensor:
    """The rows LISA picks, drawn here the way its docstring says."""
    k = math.ceil(fraction * BATCH)
    if subset == "first":
        return torch.arange(k)
    torch.manual_seed(seed)
    return torch.randperm(BATCH)[:k].sort().values


class BranchCalls:
    """Records the prior_rows the step hands the branch."""

    def __init__(self, branch):
        self.rows = []
        self.handle = branch.register_forward_pre_hook(self.keep, with_kwargs=True)

    def keep(self, module, args, kwargs):
        self.rows.append(kwargs.get("prior_rows", "not passed"))


# ----------------------------------------------------------------------------- f = 1


@pytest.mark.parametrize("subset", ["first", "random"])
def test_fraction_one_is_the_full_loss_exactly(subset):
    branch = unet_branch()
    full = lisa(branch)
    one = twin(branch, full, batch_fraction=1.0, subset=subset)
    x0, context, condition, noise, t = unet_inputs()
    logs, gradients = [], []
    for reg in (full, one):
        step = ControlTrainingStep(branch, make_objective("epsilon"), [reg])
        calls = BranchCalls(branch)
        rng = torch.get_rng_state()
        out = step(x0, context, condition, noise=noise, timesteps=t)
        assert torch.equal(torch.get_rng_state(), rng)  # nothing drawn
        calls.handle.remove()
        assert calls.rows == ["not passed"]  # the branch is called as without a subset
        logs.append(out.logs)
        gradients.append(grads(out.loss, list(branch.side_network.parameters())))
    for key in ("loss", "aux_loss", "aux_target_norm"):
        assert torch.equal(logs[0][key], logs[1][key]), key
    assert "aux_rows" not in logs[1]
    for a, b in zip(*gradients):
        assert (a is None and b is None) or torch.equal(a, b)


# ----------------------------------------------------------------------------- f < 1


@pytest.mark.parametrize("path", ["shared", "full", "batched"])
@pytest.mark.parametrize(("subset", "fraction"), [("first", 0.25), ("random", 0.5)])
def test_subset_loss_and_gradients_match_the_hand_written_formula(path, subset, fraction):
    branch = unet_branch(shared_encoder_prior=path != "full", batched_prior=path == "batched")
    reg = lisa(branch, weight=WEIGHT, batch_fraction=fraction, subset=subset)
    step = ControlTrainingStep(branch, make_objective("epsilon"), [reg])
    x0, context, condition, noise, t = unet_inputs()
    rows = expected_rows(subset, fraction, seed=3)
    names, params = trainable(step, reg)

    calls = BranchCalls(branch)
    torch.manual_seed(3)
    out = step(x0, context, condition, noise=noise, timesteps=t)
    calls.handle.remove()
    got = grads(out.loss, params)
    assert torch.equal(calls.rows[0], rows)
    assert out.logs["aux_rows"] == len(rows) == subset_size(fraction, BATCH)

    reg.remove_hooks()  # the formula captures the feature itself
    expected_loss, expected_aux = hand_written_loss(
        branch, reg.decoder, x0, context, condition, noise, t, rows
    )
    expected = grads(expected_loss, params)
    torch.testing.assert_close(out.loss, expected_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.logs["aux_loss"], expected_aux.detach(), rtol=1e-6, atol=1e-7)
    assert_grads_close(got, expected, names)
    # Not vacuous: the decoder and the side network upstream of down_5 learn from the subset.
    assert all(g is not None and g.any() for n, g in zip(names, got) if n.startswith("decoder"))
    conv_in = names.index("conv_in.weight")
    assert got[conv_in].any()


def test_subset_estimate_is_unbiased_over_draws():
    """Averaged over random draws, the subset aux loss is the full batch's."""
    branch = unet_branch()
    full = lisa(branch)
    part = twin(branch, full, batch_fraction=0.5, subset="random")
    x0, context, condition, noise, t = unet_inputs()
    with torch.no_grad():
        step = ControlTrainingStep(branch, make_objective("epsilon"), [full])
        target = step(x0, context, condition, noise=noise, timesteps=t).logs["aux_loss"]
        step = ControlTrainingStep(branch, make_objective("epsilon"), [part])
        torch.manual_seed(0)
        draws = torch.stack(
            [step(x0, context, condition, noise=noise, timesteps=t).logs["aux_loss"]
             for _ in range(24)]
        )  # fmt: skip
    assert len(set(draws.tolist())) > 10  # the draws differ
    assert abs(draws.mean() - target) < 4 * draws.std() / math.sqrt(len(draws))


# ----------------------------------------------------------------------------- every branch


def sd3_branch():
    torch.manual_seed(10)
    transformer = tiny_sd3_transformer(
        sample_size=LATENT, in_channels=4, num_layers=4, num_attention_heads=2,
        attention_head_dim=8, context_dim=CONTEXT_DIM, pooled_dim=POOLED_DIM,
    )  # fmt: skip
    return SD3ControlNetBranch(transformer, tiny_sd3_controlnet(transformer, num_layers=3))


def flux_branch():
    torch.manual_seed(11)
    transformer = tiny_flux_transformer(
        latent_channels=4, num_layers=2, num_single_layers=2, num_attention_heads=2,
        attention_head_dim=8, context_dim=CONTEXT_DIM, pooled_dim=POOLED_DIM,
        guidance_embeds=True,
    )  # fmt: skip
    return FluxControlNetBranch.from_main(transformer, num_layers=2, num_single_layers=2)


def t2i_branch():
    torch.manual_seed(12)
    unet = UNet2DConditionModel(
        **tiny_unet(
            sample_size=LATENT, in_channels=4, block_out_channels=(16, 32, 32),
            cross_attention_dim=CONTEXT_DIM, layers_per_block=1, attention_head_dim=8,
        )
    )  # fmt: skip
    return T2IAdapterBranch.from_main(unet, condition_downscale=2, num_res_blocks=1)


def branch_inputs(name: str, batch: int = 4):
    g = torch.Generator().manual_seed(5)
    if name.startswith("unet"):
        x_t = torch.randn(batch, 4, SIZE, SIZE, generator=g)
        context = Context(torch.randn(batch, 7, TEXT_DIM, generator=g))
        return x_t, TIMESTEPS[:batch].clone(), context, torch.rand(batch, 3, SIZE, SIZE)
    x_t = torch.randn(batch, 4, LATENT, LATENT, generator=g)
    # As many text tokens as rows: a context value that is not per sample must not be indexed.
    extra = {"pooled_projections": torch.randn(batch, POOLED_DIM, generator=g)}
    if name == "flux":
        extra["txt_ids"] = torch.zeros(batch, 3)
        extra["guidance"] = torch.linspace(1.0, 5.0, batch)  # one guidance per sample
    context = Context(torch.randn(batch, batch, CONTEXT_DIM, generator=g), extra=extra)
    if name == "t2i":
        return x_t, TIMESTEPS[:batch].clone(), context, torch.rand(batch, 3, 16, 16, generator=g)
    return x_t, torch.tensor([250.0, 812.5, 40.0, 600.0]), context, torch.randn(x_t.shape)


BRANCHES = {
    "unet_shared": lambda: unet_branch(),
    "unet_full": lambda: unet_branch(shared_encoder_prior=False),
    "unet_batched": lambda: unet_branch(batched_prior=True),
    "t2i": t2i_branch,
    "sd3": sd3_branch,
    "flux": flux_branch,
}


@pytest.mark.parametrize("name", BRANCHES)
def test_prior_on_rows_equals_those_rows_of_the_full_prior(name, monkeypatch):
    branch = BRANCHES[name]()
    x_t, t, context, condition = branch_inputs(name)
    rows = torch.tensor([1, 3])
    batches = []
    main = branch.main_network
    original = type(main).forward

    def record(self, *args, **kwargs):
        sample = kwargs.get("hidden_states", args[0] if args else None)
        batches.append(sample.shape[0])
        return original(self, *args, **kwargs)

    with torch.no_grad():
        full = branch(x_t, t, context, condition, with_prior=True)
        monkeypatch.setattr(type(main), "forward", record)
        part = branch(x_t, t, context, condition, with_prior=True, prior_rows=rows)
        none = branch(x_t, t, context, condition, with_prior=True, prior_rows=rows[:0])
        monkeypatch.undo()
    assert part.prior_rows is rows and part.prior.shape == (2, *x_t.shape[1:])
    torch.testing.assert_close(part.prior, full.prior[rows], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(part.output, full.output, rtol=1e-5, atol=1e-6)
    assert part.prior_at(rows) is part.prior
    torch.testing.assert_close(part.prior_at(rows[1:]), full.prior[rows[1:]], rtol=1e-5, atol=1e-6)
    assert none.prior.shape == (0, *x_t.shape[1:]) and torch.isfinite(none.output).all()
    if name in ("unet_full", "t2i", "sd3", "flux"):
        # A main-network call on the two rows, none for the empty subset.
        assert batches == [4, 2, 4]
    elif name == "unet_shared":
        assert batches == []  # the split forward calls the UNet's blocks, not the UNet


# ----------------------------------------------------------------------------- timestep subset


def timestep_lisa(branch, fraction=1.0):
    return lisa(branch, timestep_range=(500, 1000), subset="timestep", batch_fraction=fraction)


def test_timestep_subset_picks_exactly_the_in_range_rows():
    branch = unet_branch()
    objective = make_objective("epsilon")
    x0, context, condition, noise, t = unet_inputs()
    noised = objective.sample(x0, noise=noise, timesteps=t)
    in_range = torch.tensor([i for i, v in enumerate(t.tolist()) if 500 <= v < 1000])
    assert in_range.tolist() == [1, 2, 4, 6]
    assert torch.equal(timestep_lisa(branch).prior_rows(noised), in_range)
    # f caps the rows at ceil(f B): the first in-range ones.
    assert torch.equal(timestep_lisa(branch, 0.25).prior_rows(noised), in_range[:2])
    assert torch.equal(timestep_lisa(branch, 0.75).prior_rows(noised), in_range)


def test_timestep_subset_computes_the_timestep_range_loss_on_those_rows_only():
    branch = unet_branch()
    masked = lisa(branch, timestep_range=(500, 1000))
    subset = twin(branch, masked, timestep_range=(500, 1000), subset="timestep")
    x0, context, condition, noise, t = unet_inputs()
    results = []
    for reg in (masked, subset):
        step = ControlTrainingStep(branch, make_objective("epsilon"), [reg])
        calls = BranchCalls(branch)
        out = step(x0, context, condition, noise=noise, timesteps=t)
        calls.handle.remove()
        params = [*branch.side_network.parameters(), *reg.decoder.parameters()]
        results.append((out, grads(out.loss, params), calls.rows))
    (full_out, full_grads, full_rows), (sub_out, sub_grads, sub_rows) = results
    assert full_rows == ["not passed"] and sub_rows[0].tolist() == [1, 2, 4, 6]
    torch.testing.assert_close(sub_out.loss, full_out.loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(sub_out.logs["aux_loss"], full_out.logs["aux_loss"])
    assert_grads_close(sub_grads, full_grads, range(len(full_grads)))


def test_a_batch_with_no_row_in_range_gives_a_zero_aux_loss_without_nan():
    branch = unet_branch()
    reg = timestep_lisa(branch)
    step = ControlTrainingStep(branch, make_objective("epsilon"), [reg])
    x0, context, condition, noise, _ = unet_inputs(batch=4)
    calls = BranchCalls(branch)
    out = step(x0, context, condition, noise=noise, timesteps=torch.tensor([3, 100, 250, 499]))
    calls.handle.remove()
    assert calls.rows[0].numel() == 0
    for key in ("aux_loss", "aux_target_norm", "aux_loss_ratio", "lisa_loss", "aux_rows"):
        assert out.logs[key] == 0, key
    torch.testing.assert_close(out.loss, out.logs["diffusion_loss"])
    out.loss.backward()
    # The decoder stays in the graph (zero gradient, no NaN): DDP sees it used.
    for p in reg.decoder.parameters():
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p))
    for p in branch.side_network.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()


# ----------------------------------------------------------------------------- random draws


def test_random_subset_is_reproducible_under_a_fixed_seed():
    branch = unet_branch()
    reg = lisa(branch, batch_fraction=0.5, subset="random")
    objective = make_objective("epsilon")
    x0, context, condition, noise, t = unet_inputs()
    noised = objective.sample(x0, noise=noise, timesteps=t)
    torch.manual_seed(7)
    first = [reg.prior_rows(noised) for _ in range(3)]
    torch.manual_seed(7)
    again = [reg.prior_rows(noised) for _ in range(3)]
    for a, b in zip(first, again):
        assert torch.equal(a, b) and a.numel() == 4 and torch.equal(a, a.sort().values)
    assert len({tuple(r.tolist()) for r in first}) > 1  # the rows change from step to step
    # The step's generator, when it has one, draws instead of the global RNG.
    rng = torch.get_rng_state()
    drawn = reg.prior_rows(noised, generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(drawn, reg.prior_rows(noised, generator=torch.Generator().manual_seed(7)))

    step = ControlTrainingStep(branch, objective, [reg])
    losses = []
    for _ in range(2):
        torch.manual_seed(11)
        losses.append(step(x0, context, condition).loss.detach())
    assert torch.equal(*losses)


# ----------------------------------------------------------------------------- several readers


def test_several_regularizers_get_the_union_of_their_rows():
    branch = unet_branch()
    first = lisa(branch, batch_fraction=0.25)  # rows 0, 1
    timed = twin(branch, first, timestep_range=(500, 1000), subset="timestep")  # 1, 2, 4, 6
    step = ControlTrainingStep(branch, make_objective("epsilon"), [first, timed])
    x0, context, condition, noise, t = unet_inputs()
    calls = BranchCalls(branch)
    together = step(x0, context, condition, noise=noise, timesteps=t)
    calls.handle.remove()
    assert calls.rows[0].tolist() == [0, 1, 2, 4, 6]
    # Each reads its own rows of the union's prior: the sum of each one's loss alone.
    expected = together.logs["diffusion_loss"]
    for reg in (first, timed):
        alone = ControlTrainingStep(branch, make_objective("epsilon"), [reg])
        expected = (
            expected + alone(x0, context, condition, noise=noise, timesteps=t).logs["lisa_loss"]
        )
    torch.testing.assert_close(together.loss, expected)
    # One regularizer needing every row wins: the branch computes the full prior.
    assert union_rows([torch.tensor([0, 1]), None], BATCH) is None
    assert union_rows([torch.tensor([0, 2]), torch.tensor([1, 3])], 4) is None  # covers it
    assert union_rows([torch.tensor([2]), torch.tensor([0, 2])], 4).tolist() == [0, 2]


def test_prior_at_refuses_rows_the_prior_does_not_cover():
    prior = torch.arange(3.0)[:, None]
    pred = Prediction(output=torch.zeros(8, 1), prior=prior, prior_rows=torch.tensor([1, 4, 6]))
    assert pred.prior_at(torch.tensor([4])).tolist() == [[1.0]]
    assert pred.prior_at(torch.tensor([1, 6])).tolist() == [[0.0], [2.0]]
    for rows in (torch.tensor([2]), torch.tensor([7]), None):
        with pytest.raises(RuntimeError, match="prior"):
            pred.prior_at(rows)
    full = Prediction(output=torch.zeros(3, 1), prior=prior)
    assert full.prior_at(None) is prior and full.prior_at(torch.tensor([2])).tolist() == [[2.0]]


def test_a_branch_without_prior_rows_gets_the_full_prior_and_lisa_reads_its_rows():
    class OlderBranch(UNetControlNetBranch):
        def forward(self, x_t, timesteps, context, condition, with_prior=False):
            return super().forward(x_t, timesteps, context, condition, with_prior=with_prior)

    x0, context, condition, noise, t = unet_inputs()
    losses = []
    for cls in (UNetControlNetBranch, OlderBranch):
        branch = unet_branch()
        branch.__class__ = cls
        reg = lisa(branch, batch_fraction=0.25)
        step = ControlTrainingStep(branch, make_objective("epsilon"), [reg])
        losses.append(step(x0, context, condition, noise=noise, timesteps=t).logs)
    torch.testing.assert_close(losses[0]["aux_loss"], losses[1]["aux_loss"])
    torch.testing.assert_close(losses[0]["loss"], losses[1]["loss"])


# ----------------------------------------------------------------------------- user errors


@pytest.mark.parametrize("fraction", [0, -0.5, 1.5, float("nan"), True, "0.5", None])
def test_a_fraction_outside_zero_one_is_refused(fraction):
    with pytest.raises(ConfigError, match=r"batch fraction must be a number in \(0, 1\]"):
        lisa(unet_branch(), batch_fraction=fraction)


def test_unknown_subset_and_timestep_subset_without_range_are_refused():
    branch = unet_branch()
    with pytest.raises(ConfigError, match="first, random, timestep"):
        lisa(branch, subset="last")
    with pytest.raises(ConfigError, match="timestep range"):
        lisa(branch, subset="timestep")


def test_subset_size_rounds_up_and_ignores_float_noise():
    assert subset_size(0.25, 16) == 4 and subset_size(0.3, 10) == 3
    assert subset_size(0.01, 8) == 1 and subset_size(0.5, 7) == 4 and subset_size(1.0, 5) == 5


# ----------------------------------------------------------------------------- lisa train


def test_lisa_train_flags_reach_lisa_and_a_random_subset_resumes_exactly(tmp_path):
    """``--lisa_batch_fraction 0.5 --lisa_subset random``: LISA reads 2 rows of each batch of 4
    (the loss log's ``aux_rows``), and a run stopped at step 2 and resumed logs the same losses
    as a run straight through: the subsets are drawn from the RNG the checkpoint saves."""
    import json

    from factories import make_image_folder, make_pixel_model

    from lisa_control.cli import main

    model = make_pixel_model(tmp_path / "model")
    data = make_image_folder(tmp_path / "data", n=8)

    def argv(out, steps, *extra):
        return ["train", "--pretrained_model_name_or_path", str(model), "--train_data_dir",
                str(data), "--resolution", "16", "--train_batch_size", "4", "--max_train_steps",
                str(steps), "--checkpointing_steps", "2", "--validation_steps", "1000",
                "--learning_rate", "1e-3", "--report_to", "none", "--output_dir", str(out),
                "--no-progress", "--lisa_batch_fraction", "0.5", "--lisa_subset", "random",
                *extra]  # fmt: skip

    def log(out):
        return [json.loads(x) for x in (out / "loss_log.jsonl").read_text().splitlines()]

    assert main(argv(tmp_path / "straight", 4)) == 0
    assert main(argv(tmp_path / "resumed", 2)) == 0
    assert main(argv(tmp_path / "resumed", 4, "--resume_from_checkpoint", "latest")) == 0
    straight, resumed = log(tmp_path / "straight"), log(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert all(r["aux_rows"] == 2 for r in straight)
    for a, b in zip(straight, resumed):
        for key in ("loss", "aux_loss", "diffusion_loss"):
            assert a[key] == b[key], (a["step"], key)

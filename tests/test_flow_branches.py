"""Flow matching and transformer side networks: SD3 and Flux ControlNets and T2I-Adapters behind
DualBranch, LISA's token decoder, the SD3 training recipe, the tiny flow DiT.

Every model is built from a tiny config in code. For each family: loss and gradients of
ControlTrainingStep + LISA equal a formula written here with raw diffusers calls; the decoder
starts at zero; an optimizer step leaves the frozen main network untouched; LISA's gradient stays
upstream of the hooked layer; and a saved side network loads with stock ``from_pretrained`` and
drives the stock pipeline exactly as it drove the branch in training.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxControlNetModel,
    FluxControlNetPipeline,
    SD3ControlNetModel,
    StableDiffusion3ControlNetPipeline,
    StableDiffusionAdapterPipeline,
    T2IAdapter,
    UNet2DConditionModel,
)
from diffusers.training_utils import compute_density_for_timestep_sampling

from lisa_control.core.branch import Context
from lisa_control.families.flux import (
    FluxControlNetBranch,
    latent_image_ids,
    pack_latents,
    unpack_latents,
)
from lisa_control.families.sd3 import PreconditionedFlowObjective, SD3ControlNetBranch
from lisa_control.families.t2i_adapter import T2IAdapterBranch, adapter_feature_shape
from lisa_control.core.errors import ConfigError, ModelError
from lisa_control.zoo.flow import (
    count_parameters,
    null_text_context,
    tiny_flow_dit_config,
    tiny_flux_controlnet,
    tiny_flux_transformer,
    tiny_sd3_controlnet,
    tiny_sd3_transformer,
)
from lisa_control.core.hooks import FeatureHook, resolve_layer
from lisa_control.zoo.unet import tiny_unet
from lisa_control.core.objectives import (
    DiffusionObjective,
    RectifiedFlowObjective,
    sinusoidal_embedding,
)
from lisa_control.regularizers.base import StepState
from lisa_control.core.step import ControlTrainingStep
from lisa_control.regularizers.lisa import lisa_for_branch
from lisa_control.regularizers.token_decoders import TokenScoreDecoder, unpatchify

# diffusers' own FluxControlNetModel still imports the deprecated FluxPosEmbed.
pytestmark = pytest.mark.filterwarnings("ignore:.*FluxPosEmbed.*:FutureWarning")

BATCH = 2
LATENT = 8  # latent side length in every family
CONTEXT_DIM, POOLED_DIM, TEXT_TOKENS = 16, 8, 3


# ----------------------------------------------------------------------------- builders


def make_sd3_branch() -> SD3ControlNetBranch:
    torch.manual_seed(10)
    transformer = tiny_sd3_transformer(
        sample_size=LATENT,
        in_channels=4,
        num_layers=4,
        num_attention_heads=2,
        attention_head_dim=8,
        context_dim=CONTEXT_DIM,
        pooled_dim=POOLED_DIM,
    )
    # Three ControlNet blocks: the default layer block_1 has a block and projections after it.
    return SD3ControlNetBranch(transformer, tiny_sd3_controlnet(transformer, num_layers=3))


def make_flux_branch() -> FluxControlNetBranch:
    torch.manual_seed(11)
    transformer = tiny_flux_transformer(
        latent_channels=4,
        num_layers=2,
        num_single_layers=2,
        num_attention_heads=2,
        attention_head_dim=8,
        context_dim=CONTEXT_DIM,
        pooled_dim=POOLED_DIM,
        guidance_embeds=True,
    )
    return FluxControlNetBranch.from_main(transformer, num_layers=2, num_single_layers=2)


def make_t2i_branch() -> T2IAdapterBranch:
    torch.manual_seed(12)
    unet = UNet2DConditionModel(
        **tiny_unet(
            sample_size=LATENT,
            in_channels=4,
            block_out_channels=(16, 32, 32),
            cross_attention_dim=CONTEXT_DIM,
            layers_per_block=1,
            attention_head_dim=8,
        )
    )
    # Condition at twice the latent resolution, as a VAE with one downsampling would give.
    return T2IAdapterBranch.from_main(unet, condition_downscale=2, num_res_blocks=1)


FAMILIES = {
    "sd3": make_sd3_branch,
    "flux": make_flux_branch,
    "t2i": make_t2i_branch,
}


def text_context(seed: int = 0) -> Context:
    g = torch.Generator().manual_seed(seed)
    return Context(
        encoder_hidden_states=torch.randn(BATCH, TEXT_TOKENS, CONTEXT_DIM, generator=g),
        extra={"pooled_projections": torch.randn(BATCH, POOLED_DIM, generator=g)},
    )


def batch_for(name: str, seed: int = 0):
    """x0, condition, noise and timesteps (fixed, so two computations see the same draw)."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(BATCH, 4, LATENT, LATENT, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    if name == "t2i":
        condition = torch.rand(BATCH, 3, 2 * LATENT, 2 * LATENT, generator=g)
        timesteps = torch.tensor([130, 870])
    else:
        condition = torch.randn(BATCH, 4, LATENT, LATENT, generator=g)
        timesteps = torch.tensor([250.0, 812.5])
    return x0, condition, noise, timesteps


def objective_for(name: str):
    if name == "t2i":
        return DiffusionObjective(DDPMScheduler(num_train_timesteps=1000), "epsilon")
    return RectifiedFlowObjective()


def randomize_zero_parameters(module: torch.nn.Module, seed: int = 0) -> None:
    """Give every all-zero parameter (zero projections, zero heads) small random values, so that
    every path carries gradient and a parity check means something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def grads(loss, params):
    return torch.autograd.grad(loss, params, allow_unused=True)


def assert_grads_equal(got, expected, names):
    for name, a, b in zip(names, got, expected):
        if a is None or b is None:
            assert a is None and b is None, name
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)


# ----------------------------------------------------------------------------- raw formulas


def raw_sd3(branch, x_t, timesteps, ctx, condition):
    """One controlled prediction and the prior, straight from diffusers."""
    side, main = branch.side_network, branch.main_network
    pooled = ctx.extra["pooled_projections"]
    residuals = side(
        hidden_states=x_t,
        controlnet_cond=condition,
        encoder_hidden_states=ctx.encoder_hidden_states,
        # force_zeros_for_pooled_projection: the pipeline gives the ControlNet zeros.
        pooled_projections=torch.zeros_like(pooled),
        timestep=timesteps,
    ).controlnet_block_samples
    output = main(
        hidden_states=x_t,
        encoder_hidden_states=ctx.encoder_hidden_states,
        pooled_projections=pooled,
        timestep=timesteps,
        block_controlnet_hidden_states=residuals,
    ).sample
    with torch.no_grad():
        prior = main(
            hidden_states=x_t,
            encoder_hidden_states=ctx.encoder_hidden_states,
            pooled_projections=pooled,
            timestep=timesteps,
        ).sample
    return output, prior


def raw_flux(branch, x_t, timesteps, ctx, condition):
    side, main = branch.side_network, branch.main_network
    pipe = FluxControlNetPipeline
    b, c, h, w = x_t.shape
    common = dict(
        encoder_hidden_states=ctx.encoder_hidden_states,
        pooled_projections=ctx.extra["pooled_projections"],
        timestep=timesteps / 1000,
        guidance=torch.full((b,), 3.5),
        txt_ids=torch.zeros(TEXT_TOKENS, 3),
        img_ids=pipe._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32),
    )
    tokens = pipe._pack_latents(x_t, b, c, h, w)
    out = side(
        hidden_states=tokens, controlnet_cond=pipe._pack_latents(condition, b, c, h, w), **common
    )
    output = main(
        hidden_states=tokens,
        controlnet_block_samples=out.controlnet_block_samples,
        controlnet_single_block_samples=out.controlnet_single_block_samples,
        **common,
    ).sample
    with torch.no_grad():
        prior = main(hidden_states=tokens, **common).sample
    # vae_scale_factor 1: the "image" size is the latent size.
    return pipe._unpack_latents(output, h, w, 1), pipe._unpack_latents(prior, h, w, 1)


def raw_t2i(branch, x_t, timesteps, ctx, condition):
    side, main = branch.side_network, branch.main_network
    features = side(condition)
    output = main(
        x_t,
        timesteps,
        encoder_hidden_states=ctx.encoder_hidden_states,
        down_intrablock_additional_residuals=list(features),
    ).sample
    with torch.no_grad():
        prior = main(x_t, timesteps, encoder_hidden_states=ctx.encoder_hidden_states).sample
    return output, prior


RAW = {"sd3": raw_sd3, "flux": raw_flux, "t2i": raw_t2i}


def noised(name, x0, noise, timesteps):
    """The forward process and target, written out."""
    if name == "t2i":
        abar = (
            DDPMScheduler(num_train_timesteps=1000).alphas_cumprod[timesteps].reshape(-1, 1, 1, 1)
        )
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise, noise
    s = (timesteps / 1000).reshape(-1, 1, 1, 1)
    return (1 - s) * x0 + s * noise, noise - x0


# ----------------------------------------------------------------------------- per family


@pytest.mark.parametrize("name", FAMILIES)
def test_loss_and_gradients_match_the_raw_formula(name):
    branch = FAMILIES[name]()
    lisa = lisa_for_branch(branch)
    randomize_zero_parameters(branch.side_network, seed=1)
    randomize_zero_parameters(lisa.decoder, seed=2)
    step = ControlTrainingStep(branch, objective_for(name), [lisa])
    ctx = text_context()
    x0, condition, noise, timesteps = batch_for(name)
    side_names, side_params = zip(*branch.side_network.named_parameters())
    decoder_names, decoder_params = zip(*lisa.decoder.named_parameters())
    params = [*side_params, *decoder_params]
    names = [*side_names, *(f"decoder.{n}" for n in decoder_names)]

    out = step(x0, ctx, condition, noise=noise, timesteps=timesteps)
    got = grads(out.loss, params)

    lisa.remove_hooks()  # the raw formula captures the feature itself
    captured = []
    hooked = resolve_layer(branch.side_network, lisa.layer).module
    if name == "t2i":  # a stage's output
        handle = hooked.register_forward_hook(lambda m, args, output: captured.append(output))
    else:  # the input of a zero projection
        handle = hooked.register_forward_pre_hook(lambda m, args: captured.append(args[0]))
    x_t, target = noised(name, x0, noise, timesteps)
    output, prior = RAW[name](branch, x_t, timesteps, ctx, condition)
    handle.remove()
    decoded = lisa.decoder(captured[0], timesteps)
    aux = ((decoded - (target - prior)) ** 2).mean()
    expected_loss = F.mse_loss(output, target) + 0.2 * aux
    expected = grads(expected_loss, params)

    torch.testing.assert_close(out.loss, expected_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.logs["aux_loss"], aux.detach(), rtol=1e-6, atol=1e-7)
    assert_grads_equal(got, expected, names)
    # The comparison is not vacuous: most of the side network and all of the decoder learn.
    side_grads, decoder_grads = got[: len(side_params)], got[len(side_params) :]
    assert sum(g is not None and bool(g.any()) for g in side_grads) > len(side_grads) // 2
    assert all(g is not None and g.any() for g in decoder_grads)


@pytest.mark.parametrize("name", FAMILIES)
def test_decoder_starts_at_zero(name):
    branch = FAMILIES[name]()
    lisa = lisa_for_branch(branch)
    step = ControlTrainingStep(branch, objective_for(name), [lisa])
    x0, condition, noise, timesteps = batch_for(name)
    noised_batch = step.objective.sample(x0, noise=noise, timesteps=timesteps)
    hook = FeatureHook(resolve_layer(branch.side_network, lisa.layer))
    prediction = branch(noised_batch.x_t, timesteps, text_context(), condition, with_prior=True)
    decoded = lisa.decoder(hook.pop(), timesteps)
    hook.remove()
    assert decoded.shape == x0.shape
    assert torch.count_nonzero(decoded) == 0
    if name != "t2i":  # zero projections: the controlled model starts as the prior
        torch.testing.assert_close(prediction.output, prediction.prior)
    # So the first aux loss is lambda |r|^2.
    out = step(x0, text_context(), condition, noise=noise, timesteps=timesteps)
    r = (noised_batch.target - prediction.prior).pow(2).mean()
    torch.testing.assert_close(out.logs["aux_loss"], r)
    torch.testing.assert_close(out.logs["lisa_loss"], 0.2 * r)


@pytest.mark.parametrize("name", FAMILIES)
def test_optimizer_step_leaves_the_main_network_untouched(name):
    branch = FAMILIES[name]()
    lisa = lisa_for_branch(branch)
    step = ControlTrainingStep(branch, objective_for(name), [lisa]).train()
    main_before = {k: v.clone() for k, v in branch.main_network.state_dict().items()}
    side_before = {k: v.clone() for k, v in branch.side_network.state_dict().items()}
    optimizer = torch.optim.AdamW(step.trainable_parameters(), lr=1e-3)
    lisa.check_optimizer(optimizer)
    x0, condition, noise, timesteps = batch_for(name)
    step(x0, text_context(), condition, noise=noise, timesteps=timesteps).loss.backward()
    optimizer.step()

    assert not branch.main_network.training
    assert all(not p.requires_grad and p.grad is None for p in branch.main_network.parameters())
    for key, value in branch.main_network.state_dict().items():
        assert torch.equal(value, main_before[key]), key
    changed = [
        k for k, v in branch.side_network.state_dict().items() if not torch.equal(v, side_before[k])
    ]
    assert changed
    assert lisa.decoder.out.weight.abs().sum() > 0


# Parameters downstream of each family's default LISA layer: they must get no LISA gradient.
DOWNSTREAM = {
    "sd3": ("transformer_blocks.2.", "controlnet_blocks."),
    "flux": (
        "transformer_blocks.1.",
        "single_transformer_blocks.",
        "controlnet_blocks.",
        "controlnet_single_blocks.",
    ),
    "t2i": ("adapter.body.2.",),
}
UPSTREAM = {
    "sd3": (
        "transformer_blocks.0.",
        "transformer_blocks.1.",
        "pos_embed_input.",
        "time_text_embed.",
    ),
    "flux": ("transformer_blocks.0.", "x_embedder.", "controlnet_x_embedder.", "time_text_embed."),
    "t2i": ("adapter.conv_in.", "adapter.body.0.", "adapter.body.1."),
}
DEFAULT_LAYER = {"sd3": "block_1", "flux": "block_0", "t2i": "adapter.body.1"}


@pytest.mark.parametrize("name", FAMILIES)
def test_lisa_gradient_stays_upstream_of_the_hook(name):
    branch = FAMILIES[name]()
    lisa = lisa_for_branch(branch)
    assert lisa.layer == DEFAULT_LAYER[name]
    randomize_zero_parameters(branch.side_network, seed=3)
    randomize_zero_parameters(lisa.decoder, seed=4)
    objective = objective_for(name)
    x0, condition, noise, timesteps = batch_for(name)
    batch = objective.sample(x0, noise=noise, timesteps=timesteps)
    prediction = branch(batch.x_t, batch.timesteps, text_context(), condition, with_prior=True)
    aux = lisa(StepState(noised=batch, prediction=prediction, objective=objective)).loss
    named = list(branch.side_network.named_parameters())
    aux_grads = dict(zip([n for n, _ in named], grads(aux, [p for _, p in named])))

    for n, g in aux_grads.items():
        if n.startswith(DOWNSTREAM[name]):
            assert g is None or not g.any(), (
                f"{n} is downstream of {lisa.layer} but got LISA gradient"
            )
    for prefix in UPSTREAM[name]:
        assert any(
            g is not None and g.any() for n, g in aux_grads.items() if n.startswith(prefix)
        ), f"nothing under {prefix} got LISA gradient"


# ----------------------------------------------------------------------------- stock pipelines


def tiny_vae(latent_channels: int = 4, shift_factor: float | None = None) -> AutoencoderKL:
    """2x downsampling: 16 px images, 8 x 8 latents."""
    torch.manual_seed(20)
    return AutoencoderKL(
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=latent_channels,
        norm_num_groups=4,
        layers_per_block=1,
        shift_factor=shift_factor,
    )


class CallRecorder:
    """Records keyword inputs and output of every call of a module."""

    def __init__(self, module):
        self.calls = []
        self._handle = module.register_forward_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs, output):
        self.calls.append((args, dict(kwargs), output))

    def remove(self):
        self._handle.remove()


def trained_side_network(name, branch, tmp_path):
    """One optimizer step, then save; returns the folder."""
    lisa = lisa_for_branch(branch)
    step = ControlTrainingStep(branch, objective_for(name), [lisa])
    optimizer = torch.optim.AdamW(step.trainable_parameters(), lr=1e-2)
    x0, condition, noise, timesteps = batch_for(name)
    step(x0, text_context(), condition, noise=noise, timesteps=timesteps).loss.backward()
    optimizer.step()
    lisa.remove_hooks()
    branch.save_side_network(tmp_path / name)
    return tmp_path / name


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_sd3_side_network_runs_in_the_stock_pipeline(tmp_path):
    branch = make_sd3_branch()
    folder = trained_side_network("sd3", branch, tmp_path)
    controlnet = SD3ControlNetModel.from_pretrained(folder)
    assert_same_weights(controlnet, branch.side_network)
    pipe = StableDiffusion3ControlNetPipeline(
        transformer=branch.main_network,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=tiny_vae(),
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
        controlnet=controlnet,
    )
    ctx = text_context()
    transformer_calls, controlnet_calls = CallRecorder(pipe.transformer), CallRecorder(controlnet)
    image = pipe(
        prompt_embeds=ctx.encoder_hidden_states,
        pooled_prompt_embeds=ctx.extra["pooled_projections"],
        control_image=torch.rand(BATCH, 3, 2 * LATENT, 2 * LATENT),
        height=2 * LATENT,
        width=2 * LATENT,
        num_inference_steps=2,
        guidance_scale=1.0,
        output_type="latent",
    ).images
    transformer_calls.remove()
    controlnet_calls.remove()
    assert image.shape == (BATCH, 4, LATENT, LATENT) and torch.isfinite(image).all()

    # The pipeline's every transformer call equals the branch on the same x_t, t and latent.
    replay = SD3ControlNetBranch(branch.main_network, controlnet)
    assert len(transformer_calls.calls) == 2
    for (_, kw, out), (_, side_kw, _) in zip(transformer_calls.calls, controlnet_calls.calls):
        with torch.no_grad():
            prediction = replay(
                kw["hidden_states"], kw["timestep"], ctx, side_kw["controlnet_cond"]
            )
        torch.testing.assert_close(prediction.output, out[0], rtol=1e-5, atol=1e-6)


def test_flux_side_network_runs_in_the_stock_pipeline(tmp_path):
    branch = make_flux_branch()
    folder = trained_side_network("flux", branch, tmp_path)
    controlnet = FluxControlNetModel.from_pretrained(folder)
    assert_same_weights(controlnet, branch.side_network)
    pipe = FluxControlNetPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=tiny_vae(shift_factor=0.0),
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=branch.main_network,
        controlnet=controlnet,
    )
    ctx = text_context()
    transformer_calls, controlnet_calls = CallRecorder(pipe.transformer), CallRecorder(controlnet)
    tokens = pipe(
        prompt_embeds=ctx.encoder_hidden_states,
        pooled_prompt_embeds=ctx.extra["pooled_projections"],
        control_image=torch.rand(BATCH, 3, 2 * LATENT, 2 * LATENT),
        height=2 * LATENT,
        width=2 * LATENT,
        num_inference_steps=2,
        guidance_scale=3.5,
        output_type="latent",
    ).images
    transformer_calls.remove()
    controlnet_calls.remove()
    assert tokens.shape == (BATCH, LATENT * LATENT // 4, 16) and torch.isfinite(tokens).all()

    replay = FluxControlNetBranch(branch.main_network, controlnet, guidance_scale=3.5)
    assert len(transformer_calls.calls) == 2
    for (_, kw, out), (_, side_kw, _) in zip(transformer_calls.calls, controlnet_calls.calls):
        x_t = unpack_latents(kw["hidden_states"], LATENT, LATENT)
        condition = unpack_latents(side_kw["controlnet_cond"], LATENT, LATENT)
        with torch.no_grad():
            prediction = replay(x_t, kw["timestep"] * 1000, ctx, condition)
        torch.testing.assert_close(pack_latents(prediction.output), out[0], rtol=1e-5, atol=1e-6)


def test_t2i_adapter_runs_in_the_stock_pipeline(tmp_path):
    branch = make_t2i_branch()
    folder = trained_side_network("t2i", branch, tmp_path)
    adapter = T2IAdapter.from_pretrained(folder)
    assert_same_weights(adapter, branch.side_network)
    pipe = StableDiffusionAdapterPipeline(
        vae=tiny_vae(),
        text_encoder=None,
        tokenizer=None,
        unet=branch.main_network,
        adapter=adapter,
        scheduler=DDIMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    ctx = text_context()
    condition = torch.rand(BATCH, 3, 2 * LATENT, 2 * LATENT)
    unet_calls = CallRecorder(pipe.unet)
    latents = pipe(
        prompt_embeds=ctx.encoder_hidden_states,
        image=condition,
        height=2 * LATENT,
        width=2 * LATENT,
        num_inference_steps=2,
        guidance_scale=1.0,
        output_type="latent",
    ).images
    unet_calls.remove()
    assert latents.shape == (BATCH, 4, LATENT, LATENT) and torch.isfinite(latents).all()

    replay = T2IAdapterBranch(branch.main_network, adapter)
    assert len(unet_calls.calls) == 2
    for args, _, out in unet_calls.calls:
        with torch.no_grad():
            prediction = replay(args[0], args[1], ctx, condition)
        torch.testing.assert_close(prediction.output, out[0], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- pieces


def test_flux_packing_matches_the_pipeline():
    x = torch.randn(2, 4, 6, 10)
    tokens = pack_latents(x)
    torch.testing.assert_close(
        tokens, FluxControlNetPipeline._pack_latents(x, 2, 4, 6, 10), rtol=0, atol=0
    )
    torch.testing.assert_close(unpack_latents(tokens, 6, 10), x, rtol=0, atol=0)
    expected_ids = FluxControlNetPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32)
    torch.testing.assert_close(latent_image_ids(6, 10), expected_ids, rtol=0, atol=0)
    with pytest.raises(ModelError, match="even"):
        pack_latents(torch.randn(1, 4, 5, 6))


def test_token_decoder_formula_and_layout():
    torch.manual_seed(0)
    decoder = TokenScoreDecoder(hidden_dim=12, out_channels=3, patch_size=2, grid_size=(2, 3))
    tokens, t = torch.randn(2, 6, 12), torch.tensor([10.0, 900.0])
    assert torch.count_nonzero(decoder(tokens, t)) == 0
    torch.nn.init.normal_(decoder.out.weight), torch.nn.init.normal_(decoder.out.bias)

    shift, scale = decoder.time_mlp(sinusoidal_embedding(t, 256)).chunk(2, dim=-1)
    h = F.layer_norm(tokens, (12,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
    patches = h @ decoder.out.weight.T + decoder.out.bias
    expected = torch.zeros(2, 3, 4, 6)
    for n in range(6):  # token n is grid cell (n // 3, n % 3); features ordered (dy, dx, c)
        i, j = divmod(n, 3)
        cell = patches[:, n].reshape(2, 2, 2, 3)
        expected[:, :, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2] = cell.permute(0, 3, 1, 2)
    torch.testing.assert_close(decoder(tokens, t), expected)
    torch.testing.assert_close(unpatchify(patches, (2, 3), 2), expected)
    with pytest.raises(ModelError, match="grid"):
        decoder(torch.randn(2, 5, 12), t)
    # grid_size=None: a square grid inferred from the number of tokens.
    square = TokenScoreDecoder(hidden_dim=12, out_channels=3, patch_size=2, grid_size=None)
    assert square(torch.randn(1, 9, 12), torch.tensor([5.0])).shape == (1, 3, 6, 6)


def test_flow_residual_is_a_rescaled_likelihood_score():
    """u_cond - u_prior = -(s / (1 - s)) (score_cond - score_prior), through the objective's own
    score of a velocity: the relation in sd3_controlnet's docstring."""
    objective = RectifiedFlowObjective()
    x_t, u_cond, u_prior = torch.randn(3, 2, 4, 5, 5).unbind(0)
    timesteps = torch.tensor([200.0, 700.0])
    s = (timesteps / 1000).reshape(-1, 1, 1, 1)
    likelihood_score = objective.score(u_cond, x_t, timesteps) - objective.score(
        u_prior, x_t, timesteps
    )
    torch.testing.assert_close(u_cond - u_prior, -(s / (1 - s)) * likelihood_score)


def test_preconditioned_objective_follows_the_diffusers_sd3_recipe():
    shift = 3.0
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    objective = PreconditionedFlowObjective.from_scheduler(
        scheduler, weighting_scheme="logit_normal"
    )
    torch.testing.assert_close(objective.sigma_table(), scheduler.sigmas.float())

    # Timesteps: diffusers' density, index into the scheduler's timesteps.
    x0 = torch.randn(4, 3, 4, 4)
    for scheme in ("logit_normal", "mode", "none"):
        objective = PreconditionedFlowObjective(weighting_scheme=scheme, shift=shift)
        batch = objective.sample(x0, generator=torch.Generator().manual_seed(5))
        u = compute_density_for_timestep_sampling(
            scheme,
            4,
            logit_mean=0.0,
            logit_std=1.0,
            mode_scale=1.29,
            generator=torch.Generator().manual_seed(5),
        )
        index = (u * 1000).long().clamp(max=999)
        torch.testing.assert_close(batch.timesteps.float(), scheduler.timesteps[index].float())

    # Loss: the script's preconditioned formula, with its weighting.
    noise = torch.randn_like(x0)
    timesteps = torch.tensor([100.0, 400.0, 650.0, 990.0])
    model_pred = torch.randn_like(x0)
    sigmas = (timesteps / 1000).reshape(-1, 1, 1, 1)
    noisy = (1 - sigmas) * x0 + sigmas * noise
    weightings = {
        "sigma_sqrt": sigmas**-2.0,
        "cosmap": 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2)),
        "logit_normal": torch.ones_like(sigmas),
    }
    for scheme, weighting in weightings.items():
        objective = PreconditionedFlowObjective(weighting_scheme=scheme)
        batch = objective.sample(x0, noise=noise, timesteps=timesteps)
        model_x0 = model_pred * (-sigmas) + noisy
        expected = (weighting * (model_x0 - x0) ** 2).reshape(4, -1).mean(1).mean()
        torch.testing.assert_close(objective.loss(model_pred, batch), expected)
        torch.testing.assert_close(batch.target, noise - x0)  # LISA's residual stays a velocity
    # sigma^-2 weighting of the preconditioned loss is exactly the velocity MSE.
    objective = PreconditionedFlowObjective(weighting_scheme="sigma_sqrt")
    batch = objective.sample(x0, noise=noise, timesteps=timesteps)
    torch.testing.assert_close(
        objective.loss(model_pred, batch), F.mse_loss(model_pred, noise - x0)
    )
    with pytest.raises(ConfigError, match="weighting_scheme"):
        PreconditionedFlowObjective(weighting_scheme="cosine")


def test_tiny_flow_dit_is_small_and_trains_with_a_null_context():
    config = tiny_flow_dit_config()
    transformer = tiny_sd3_transformer()
    assert dict(transformer.config)["num_layers"] == config["num_layers"]
    controlnet = tiny_sd3_controlnet(transformer)
    assert count_parameters(transformer) < 10_000_000 and count_parameters(controlnet) < 10_000_000
    assert controlnet.config.extra_conditioning_channels == 0
    # diffusers' from_transformer writes into the transformer's config; ours restores it.
    assert transformer.config.num_layers == config["num_layers"]
    assert "extra_conditioning_channels" not in transformer.config

    branch = SD3ControlNetBranch(transformer, controlnet)
    lisa = lisa_for_branch(branch)
    assert lisa.layer == "block_0"  # 2 ControlNet blocks
    step = ControlTrainingStep(branch, RectifiedFlowObjective(), [lisa])
    ctx = null_text_context(transformer.config, 2)
    assert ctx.encoder_hidden_states.shape == (2, 1, config["joint_attention_dim"])
    x0 = torch.randn(2, 3, 32, 32)
    out = step(x0, ctx, torch.rand(2, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert torch.isfinite(out.loss) and lisa.decoder.out.weight.grad.abs().sum() > 0


def test_users_get_clear_errors():
    sd3 = make_sd3_branch()
    ctx = text_context()
    x = torch.randn(BATCH, 4, LATENT, LATENT)
    t = torch.tensor([100.0, 200.0])
    with pytest.raises(ModelError, match="channels|shape"):
        sd3(x, t, ctx, torch.randn(BATCH, 3, LATENT, LATENT))
    with pytest.raises(ModelError, match="resolution"):
        sd3(x, t, ctx, torch.randn(BATCH, 4, 2 * LATENT, 2 * LATENT))
    with pytest.raises(ModelError, match="pooled"):
        sd3(x, t, Context(ctx.encoder_hidden_states), x)
    with pytest.raises(ConfigError, match="Valid names"):
        lisa_for_branch(sd3, layer="transformer_blocks.0")
    narrower = tiny_sd3_transformer(
        sample_size=LATENT,
        in_channels=4,
        num_layers=2,
        num_attention_heads=1,
        attention_head_dim=8,
        context_dim=CONTEXT_DIM,
        pooled_dim=POOLED_DIM,
    )
    with pytest.raises(ModelError, match="does not fit"):
        SD3ControlNetBranch(narrower, sd3.side_network)

    flux = make_flux_branch()
    with pytest.raises(ModelError, match="condition"):
        flux(x, t, ctx, torch.randn(BATCH, 4, 2 * LATENT, 2 * LATENT))
    three_channels = tiny_flux_transformer(
        latent_channels=3,
        attention_head_dim=8,
        num_attention_heads=2,
        context_dim=CONTEXT_DIM,
        pooled_dim=POOLED_DIM,
    )
    with pytest.raises(ModelError, match="does not fit"):
        FluxControlNetBranch(flux.main_network, tiny_flux_controlnet(three_channels))

    t2i = make_t2i_branch()
    with pytest.raises(ModelError, match="2x the sample"):
        t2i(x, t.long(), ctx, torch.rand(BATCH, 3, LATENT, LATENT))
    with pytest.raises(ModelError, match="adapter stage"):
        wrong_widths = T2IAdapter(channels=[16, 16, 32], num_res_blocks=1, downscale_factor=2)
        T2IAdapterBranch(t2i.main_network, wrong_widths)
    assert adapter_feature_shape(t2i.side_network, "adapter.body.2", LATENT, 2) == (32, 2)
    with pytest.raises(ConfigError, match="adapter.body"):
        lisa_for_branch(t2i, layer="adapter.conv_in")


def test_lisa_for_branch_also_builds_the_unet_controlnet_recipe():
    from lisa_control.families.unet import UNetControlNetBranch

    unet = make_t2i_branch().main_network
    branch = UNetControlNetBranch.from_main(unet, condition_downscale=1)
    lisa = lisa_for_branch(branch, weight=0.5)
    assert lisa.layer == "down_5" and lisa.weight == 0.5
    t = torch.tensor([10, 500])
    x = torch.randn(BATCH, 4, LATENT, LATENT)
    hook = FeatureHook(resolve_layer(branch.side_network, lisa.layer))
    branch(x, t, text_context(), torch.rand(BATCH, 3, LATENT, LATENT))
    assert lisa.decoder(hook.pop(), t).shape == x.shape


@pytest.mark.parametrize("size", [8, 64, 128])
def test_flux_pipeline_schedule_is_flux_pipelines(size):
    """The shift for a latent of size x size is diffusers' own calculate_shift of its token
    count, and the sigmas are FluxPipeline's; a static-shift scheduler gets the sigmas alone."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from lisa_control.families.flux import pipeline_schedule

    dynamic = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    schedule = pipeline_schedule(dynamic, size, size, 4)
    assert schedule["mu"] == pytest.approx(calculate_shift((size // 2) ** 2))
    assert np.allclose(schedule["sigmas"], [1.0, 0.75, 0.5, 0.25])
    static = pipeline_schedule(FlowMatchEulerDiscreteScheduler(shift=1.0), size, size, 4)
    assert set(static) == {"sigmas"}

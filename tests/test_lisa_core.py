"""Acceptance tests of the core: the LISA loss and its gradients against the formula written out
with raw diffusers calls, what the loss may and may not touch, the paper's parameter count, the
saved side network inside diffusers' stock pipeline, our sampler against that pipeline, and the
errors a user can cause. Everything is built from small configs in code; CPU only.

    L = MSE(y_full, y) + 0.2 * MSE(D(h, t), y - y_main)

y: the training target (noise, or v); y_full: the UNet with the ControlNet's residuals; y_main:
the UNet alone (no gradient); h: the input of controlnet_down_blocks[5]; D: the LISA decoder.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionControlNetPipeline,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)
from safetensors import safe_open

from lisa_control import (
    ConfigError,
    Context,
    ControlTrainingStep,
    LikelihoodScoreAlignment,
    UNetControlNetBranch,
    make_objective,
)
from lisa_control.zoo.unet import SD21_BASE_UNET, tiny_unet
from lisa_control.regularizers.base import StepState
from lisa_control.eval.sampling import decode, latent_shape, sample

# diffusers' schedulers build sigmas with a numpy call that numpy 2 flags; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

LATENT_SIZE = 16
CONDITION_SIZE = 8 * LATENT_SIZE  # SD layout: the condition is at pixel resolution
TEXT_DIM = 32  # tiny_unet's cross_attention_dim
TEXT_TOKENS = 7
HOOKED = 5  # down_5, the paper's layer
LISA_WEIGHT = 0.2


# ----------------------------------------------------------------------------- builders


def tiny_branch(sdxl_like: bool = False) -> UNetControlNetBranch:
    """A random tiny latent UNet (4 channels, 3 blocks) and a ControlNet copied from it that
    reads an 8x larger condition."""
    unet = UNet2DConditionModel(
        **tiny_unet(sample_size=LATENT_SIZE, in_channels=4, sdxl_like=sdxl_like)
    )
    return UNetControlNetBranch.from_main(unet)


def tiny_lisa(branch, **kwargs) -> LikelihoodScoreAlignment:
    kwargs.setdefault("layer", f"down_{HOOKED}")
    return LikelihoodScoreAlignment(
        branch.side_network, out_channels=4, sample_size=LATENT_SIZE, **kwargs
    )


def randomize_(module: torch.nn.Module, std: float = 0.05) -> None:
    """Give zero-initialised layers random weights, as training would: with zero convs and a zero
    decoder most gradients are trivially zero and a parity check would prove little."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)


def train_like(branch, lisa=None) -> None:
    """Move every zero-initialised part off zero: ControlNet zero convs, the condition encoder's
    last conv and the decoder's output conv."""
    side = branch.side_network
    randomize_(side.controlnet_down_blocks)
    randomize_(side.controlnet_mid_block)
    randomize_(side.controlnet_cond_embedding.conv_out)
    if lisa is not None:
        randomize_(lisa.decoder.out)


def batch(n: int = 2, seed: int = 0, added: bool = False):
    """x0, context, condition, noise, timesteps: every random draw of a step, fixed."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, 4, LATENT_SIZE, LATENT_SIZE, generator=g)
    text = torch.randn(n, TEXT_TOKENS, TEXT_DIM, generator=g)
    added_cond = None
    if added:
        size = CONDITION_SIZE
        added_cond = {
            "text_embeds": torch.randn(n, TEXT_DIM, generator=g),
            # (original size, crop top-left, target size), as SDXL's pipeline builds them
            "time_ids": torch.tensor([[size, size, 0, 0, size, size]]).float().repeat(n, 1),
        }
    condition = torch.rand(n, 3, CONDITION_SIZE, CONDITION_SIZE, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    timesteps = torch.tensor([37, 801][:n] + [500] * max(0, n - 2))
    return x0, Context(text, added_cond), condition, noise, timesteps


def named_grads(named_params):
    return {n: (torch.zeros_like(p) if p.grad is None else p.grad.clone()) for n, p in named_params}


# ----------------------------------------------------------------------------- loss parity


def reference_loss(branch, decoder, scheduler, prediction_type, x0, context, condition, noise, t):
    """The LISA loss with raw diffusers calls and a hook of our own."""
    unet, controlnet = branch.main_network, branch.side_network
    x_t = scheduler.add_noise(x0, noise, t)
    target = noise if prediction_type == "epsilon" else scheduler.get_velocity(x0, noise, t)
    text = context.encoder_hidden_states

    captured = []
    handle = controlnet.controlnet_down_blocks[HOOKED].register_forward_pre_hook(
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
    decoded = decoder(h, t)
    return F.mse_loss(y_full, target) + LISA_WEIGHT * F.mse_loss(decoded, target - y_main)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("state", ["init", "trained"])
def test_loss_and_every_gradient_match_the_formula(prediction_type, state):
    branch = tiny_branch()
    lisa = tiny_lisa(branch, weight=LISA_WEIGHT)
    if state == "trained":
        train_like(branch, lisa)
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    step = ControlTrainingStep(branch, make_objective(prediction_type, scheduler), [lisa])
    x0, context, condition, noise, t = batch()
    trainable = [(n, p) for n, p in step.named_parameters() if p.requires_grad]
    assert {id(p) for _, p in trainable} == {id(p) for p in step.trainable_parameters()}
    assert any(n.startswith("regularizers.0.decoder.") for n, _ in trainable)

    expected = reference_loss(
        branch, lisa.decoder, scheduler, prediction_type, x0, context, condition, noise, t
    )
    expected.backward()
    expected_grads = named_grads(trainable)
    step.zero_grad(set_to_none=True)

    out = step(x0, context, condition, noise=noise, timesteps=t)
    out.loss.backward()
    grads = named_grads(trainable)

    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=1e-7)
    for name in expected_grads:
        torch.testing.assert_close(
            grads[name],
            expected_grads[name],
            rtol=1e-5,
            atol=1e-8,
            msg=lambda m, n=name: f"{n}: {m}",
        )
    nonzero = {name for name, g in expected_grads.items() if g.abs().sum() > 0}
    if state == "init":
        # Zero convs and a zero decoder block every path upstream: only they learn at step one.
        zero_initialised = ("controlnet_down_blocks.", "controlnet_mid_block.", "decoder.out.")
        assert nonzero == {n for n in expected_grads if any(z in n for z in zero_initialised)}
    else:
        # The comparison is not vacuous: most gradients are real.
        assert len(nonzero) > len(expected_grads) * 3 // 4


def test_decoder_is_zero_at_init():
    branch = tiny_branch()
    lisa = tiny_lisa(branch)
    x0, context, condition, noise, t = batch()
    captured = []
    hooked = branch.side_network.controlnet_down_blocks[HOOKED]
    handle = hooked.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    branch(x0, t, context, condition)
    handle.remove()
    (feature,) = captured
    assert feature.abs().sum() > 0
    decoded = lisa.decoder(feature, t)
    assert decoded.shape == x0.shape
    assert torch.count_nonzero(decoded) == 0


# ----------------------------------------------------------------------------- what trains


def test_main_network_gets_no_gradient_and_keeps_its_weights():
    branch = tiny_branch()
    lisa = tiny_lisa(branch)
    train_like(branch)
    step = ControlTrainingStep(branch, make_objective("epsilon"), [lisa])
    main_before = {k: v.clone() for k, v in branch.main_network.state_dict().items()}
    side_before = {k: v.clone() for k, v in branch.side_network.state_dict().items()}
    optimizer = torch.optim.AdamW(step.trainable_parameters(), lr=1e-3)
    lisa.check_optimizer(optimizer)

    x0, context, condition, noise, t = batch()
    step(x0, context, condition, noise=noise, timesteps=t).loss.backward()
    optimizer.step()

    assert all(p.grad is None for p in branch.main_network.parameters())
    assert all(not p.requires_grad for p in branch.main_network.parameters())
    for key, value in branch.main_network.state_dict().items():
        assert torch.equal(value, main_before[key]), key
    side_after = branch.side_network.state_dict()
    changed = [k for k, v in side_after.items() if not torch.equal(v, side_before[k])]
    assert len(changed) > len(side_before) // 2
    assert lisa.decoder.out.weight.abs().sum() > 0  # left its zero init


def module_grad_norm(module: torch.nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


def test_aux_loss_reaches_only_the_side_network_upstream_of_the_hooked_layer():
    branch = tiny_branch()
    lisa = tiny_lisa(branch)
    train_like(branch, lisa)
    objective = make_objective("epsilon")
    x0, context, condition, noise, t = batch()
    noised = objective.sample(x0, noise=noise, timesteps=t)
    prediction = branch(noised.x_t, noised.timesteps, context, condition, with_prior=True)
    aux = lisa(StepState(noised=noised, prediction=prediction, objective=objective)).loss
    aux.backward()

    side = branch.side_network
    # down_5 = input of controlnet_down_blocks[5] = output of down_blocks[1]'s second layer:
    # [conv_in | block 0: 2 layers + downsampler | block 1: 2 layers + downsampler | block 2].
    assert len(side.controlnet_down_blocks) == 9
    downstream = [
        *side.controlnet_down_blocks,
        side.controlnet_mid_block,
        side.mid_block,
        side.down_blocks[1].downsamplers,
        side.down_blocks[2],
    ]
    for module in downstream:
        assert module_grad_norm(module) == 0, module
    upstream = [
        side.conv_in,
        side.time_embedding,
        side.controlnet_cond_embedding,
        side.down_blocks[0],
        side.down_blocks[1].resnets,
        side.down_blocks[1].attentions,
    ]
    for module in upstream:
        assert module_grad_norm(module) > 0, module
    assert module_grad_norm(lisa.decoder) > 0
    assert all(p.grad is None for p in branch.main_network.parameters())


# ----------------------------------------------------------------------------- paper's count


def test_parameter_count_on_the_sd21_base_unet():
    from accelerate import init_empty_weights

    with init_empty_weights():
        unet = UNet2DConditionModel(**SD21_BASE_UNET)
        controlnet = ControlNetModel.from_unet(unet, load_weights_from_unet=False)
    lisa = LikelihoodScoreAlignment(controlnet, layer="down_5", out_channels=4, sample_size=64)
    side = sum(p.numel() for p in controlnet.parameters())
    decoder = sum(p.numel() for p in lisa.parameters())
    assert side == 364_228_240
    assert decoder == 381_124
    assert side + decoder == 364_609_364
    # The decoder's parameters are exactly LISA's; the side network's are not among them.
    assert decoder == sum(p.numel() for p in lisa.decoder.parameters())


# ----------------------------------------------------------------------------- save and sample


def tiny_vae() -> AutoencoderKL:
    """A random 8x VAE (four levels); sampling with output_type='latent' only reads its scale
    factor, decode() runs it."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=CONDITION_SIZE,
    )


def stock_pipeline(unet, controlnet, scheduler, vae=None) -> StableDiffusionControlNetPipeline:
    # No text encoder or tokenizer: the pipeline takes prompt_embeds / negative_prompt_embeds.
    return StableDiffusionControlNetPipeline(
        vae=vae or tiny_vae(),
        text_encoder=None,
        tokenizer=None,
        unet=unet,
        controlnet=controlnet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def test_saved_side_network_is_a_plain_controlnet(tmp_path):
    branch = tiny_branch()
    lisa = tiny_lisa(branch)
    train_like(branch, lisa)
    branch.save_side_network(tmp_path)

    files = sorted(p.name for p in tmp_path.iterdir())
    weights = [name for name in files if name != "config.json"]
    assert weights and all(name.endswith(".safetensors") for name in weights), files
    keys = set()
    for name in weights:
        with safe_open(tmp_path / name, framework="pt") as f:
            keys |= set(f.keys())
    assert keys == set(branch.side_network.state_dict())
    decoder_keys = {f"decoder.{k}" for k in lisa.decoder.state_dict()} | set(
        lisa.decoder.state_dict()
    )
    assert not keys & decoder_keys
    assert not any(k.startswith(("decoder.", "regularizers.", "out.", "body.")) for k in keys)

    loaded = ControlNetModel.from_pretrained(tmp_path)
    assert type(loaded) is ControlNetModel
    for key, value in branch.side_network.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


SCHEDULERS = {
    "ddim": lambda: DDIMScheduler(num_train_timesteps=1000),
    "unipc": lambda: UniPCMultistepScheduler(num_train_timesteps=1000),
    "dpm++": lambda: DPMSolverMultistepScheduler(num_train_timesteps=1000),
    "euler": lambda: EulerDiscreteScheduler(num_train_timesteps=1000),  # init_noise_sigma != 1
}


@pytest.mark.parametrize(
    "scheduler_name, guidance_scale, conditioning_scale",
    [("ddim", 1.0, 1.0), ("unipc", 4.0, 1.0), ("dpm++", 2.5, 0.7), ("euler", 3.0, 1.0)],
)
def test_sampler_matches_the_stock_pipeline_with_the_saved_side_network(
    tmp_path, scheduler_name, guidance_scale, conditioning_scale
):
    branch = tiny_branch()
    train_like(branch)
    branch.save_side_network(tmp_path)
    controlnet = ControlNetModel.from_pretrained(tmp_path).eval()
    loaded = UNetControlNetBranch(branch.main_network, controlnet).eval()
    scheduler = SCHEDULERS[scheduler_name]()
    pipe = stock_pipeline(branch.main_network, controlnet, scheduler)
    pipe.set_progress_bar_config(disable=True)

    _, context, condition, _, _ = batch(n=2)
    negative = Context(torch.randn(1, TEXT_TOKENS, TEXT_DIM).expand(2, -1, -1))
    steps, seed = 4, 123

    expected = pipe(
        prompt_embeds=context.encoder_hidden_states,
        negative_prompt_embeds=negative.encoder_hidden_states,
        image=condition,
        height=CONDITION_SIZE,
        width=CONDITION_SIZE,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        controlnet_conditioning_scale=conditioning_scale,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
    ).images
    ours = sample(
        loaded,
        condition,
        context,
        scheduler,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        negative_context=negative,
        generator=torch.Generator().manual_seed(seed),
        conditioning_scale=conditioning_scale,
    )
    assert ours.shape == (2, 4, LATENT_SIZE, LATENT_SIZE)
    # Same operations in the same order: equal up to float noise (bit-equal in practice).
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)

    # The same start, given explicitly (already scaled), gives the same result.
    start = torch.randn(ours.shape, generator=torch.Generator().manual_seed(seed))
    again = sample(
        loaded,
        condition,
        context,
        scheduler,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        negative_context=negative,
        conditioning_scale=conditioning_scale,
        latents=start * scheduler.init_noise_sigma,
    )
    torch.testing.assert_close(again, ours, rtol=1e-6, atol=1e-6)

    # The side network is not a no-op here, so the parity is about the control path too.
    if scheduler_name == "ddim":
        untrained = ControlNetModel.from_unet(branch.main_network)
        plain = sample(
            UNetControlNetBranch(branch.main_network, untrained),
            condition,
            context,
            scheduler,
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(seed),
        )
        assert not torch.allclose(plain, ours, atol=1e-4)


def test_decode_with_and_without_a_vae():
    vae = tiny_vae().eval()
    latents = torch.randn(1, 4, 4, 4)
    image = decode(vae, latents)
    assert image.shape == (1, 3, 32, 32)
    assert image.min() >= -1 and image.max() <= 1
    with torch.no_grad():
        raw = vae.decode(latents / vae.config.scaling_factor).sample
    torch.testing.assert_close(image, raw.clamp(-1, 1))

    pixels = torch.tensor([-3.0, -0.5, 0.0, 0.25, 2.0])
    assert torch.equal(decode(None, pixels), pixels.clamp(-1, 1))


def test_pixel_space_sampling_and_guidance_needs_a_negative_context():
    unet = UNet2DConditionModel(
        **tiny_unet(sample_size=8, block_out_channels=(16, 32), layers_per_block=1)
    )
    branch = UNetControlNetBranch.from_main(unet, condition_downscale=1).eval()
    condition = torch.rand(1, 3, 8, 8)
    context = Context(torch.zeros(2, 1, TEXT_DIM))
    assert latent_shape(branch, condition, 2) == (2, 3, 8, 8)
    x0 = sample(branch, condition, context, DDIMScheduler(), num_inference_steps=2)
    assert x0.shape == (2, 3, 8, 8) and torch.isfinite(x0).all()
    with pytest.raises(ConfigError, match="negative_context"):
        sample(branch, condition, context, DDIMScheduler(), guidance_scale=3.0)


# ----------------------------------------------------------------------------- user errors


def test_unknown_layer_lists_the_valid_names():
    branch = tiny_branch()
    for bad in ("down_99", "middle", "down_blocks.9"):
        with pytest.raises(ConfigError) as info:
            tiny_lisa(branch, layer=bad)
        message = str(info.value)
        assert repr(bad) in message
        assert "down_0" in message and "down_8" in message and "mid" in message


@pytest.mark.parametrize("weight", [-0.2, "0.2", None, float("nan"), True])
def test_bad_weight_is_a_config_error(weight):
    branch = tiny_branch()
    with pytest.raises(ConfigError, match="weight"):
        tiny_lisa(branch, weight=weight)


def test_check_optimizer_requires_the_decoder():
    branch = tiny_branch()
    lisa = tiny_lisa(branch)
    without = torch.optim.AdamW(branch.side_network.parameters())
    with pytest.raises(ConfigError, match="optimizer"):
        lisa.check_optimizer(without)
    step = ControlTrainingStep(branch, make_objective("epsilon"), [lisa])
    lisa.check_optimizer(torch.optim.AdamW(step.trainable_parameters()))


def test_training_loop_that_forgot_the_decoder_fails_after_a_few_steps():
    branch = tiny_branch()
    lisa = tiny_lisa(branch, optimizer_check_after=3)
    step = ControlTrainingStep(branch, make_objective("epsilon"), [lisa])
    optimizer = torch.optim.AdamW(branch.side_network.parameters(), lr=1e-4)  # decoder missing
    x0, context, condition, _, _ = batch(n=1)
    with pytest.raises(ConfigError, match="not in the optimizer"):
        for _ in range(6):
            step(x0, context, condition).loss.backward()
            optimizer.step()
            optimizer.zero_grad()


def test_the_same_loop_with_the_decoder_keeps_going():
    branch = tiny_branch()
    lisa = tiny_lisa(branch, optimizer_check_after=3)
    step = ControlTrainingStep(branch, make_objective("epsilon"), [lisa])
    optimizer = torch.optim.AdamW(step.trainable_parameters(), lr=1e-4)
    x0, context, condition, _, _ = batch(n=1)
    for _ in range(5):
        step(x0, context, condition).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


# ----------------------------------------------------------------------------- SDXL shape


def test_sdxl_shaped_unet_trains_a_step_with_lisa_and_samples_with_guidance():
    branch = tiny_branch(sdxl_like=True)
    lisa = tiny_lisa(branch)
    step = ControlTrainingStep(branch, make_objective("epsilon"), [lisa])
    optimizer = torch.optim.AdamW(step.trainable_parameters(), lr=1e-3)
    x0, context, condition, noise, t = batch(added=True)
    before = lisa.decoder.out.weight.clone()

    out = step(x0, context, condition, noise=noise, timesteps=t)
    assert torch.isfinite(out.loss) and out.logs["aux_loss"] > 0
    out.loss.backward()
    assert lisa.decoder.out.weight.grad.abs().sum() > 0
    assert branch.side_network.controlnet_down_blocks[0].weight.grad.abs().sum() > 0
    optimizer.step()
    assert not torch.equal(before, lisa.decoder.out.weight)

    # Guidance concatenates the added conditioning too: [negative, positive].
    negative = Context(
        torch.zeros(1, TEXT_TOKENS, TEXT_DIM),
        {k: v[:1] * 0 for k, v in context.added_cond_kwargs.items()},
    )
    branch.eval()
    x = sample(
        branch,
        condition,
        context,
        DDIMScheduler(),
        num_inference_steps=2,
        guidance_scale=2.0,
        negative_context=negative,
        generator=torch.Generator().manual_seed(0),
    )
    assert x.shape == x0.shape and torch.isfinite(x).all()

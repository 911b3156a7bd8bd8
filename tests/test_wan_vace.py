"""The Wan VACE family: a ``WanVACETransformer3DModel`` whose VACE part is the side network.

Every model is built from a tiny config in code (``zoo.wan``). The branch is checked against a
formula written here with diffusers' own calls: the stock transformer run with the side
network's weights in its VACE part (``torch.func.functional_call``) and, for the prior, the Wan
text-to-video transformer with the same weights. The saved side network is checked in a stock
transformer inside the stock ``WanVACEPipeline``, and ``lisa train`` on a Wan VACE folder.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel, WanVACEPipeline, WanVACETransformer3DModel
from factories import tiny_clip
from PIL import Image
from safetensors.torch import load_file

from lisa_control.core.branch import Context
from lisa_control.core.errors import ConfigError, ModelError
from lisa_control.core.hooks import heavy_blocks, resolve_layer
from lisa_control.core.step import ControlTrainingStep
from lisa_control.eval.generate import condition_seed
from lisa_control.families import MainModel, get_family
from lisa_control.families.wan_vace import (
    WanVACEBranch,
    WanVACESideNetwork,
    transformer_with_vace_part,
)
from lisa_control.regularizers.lisa import lisa_for_branch
from lisa_control.regularizers.token_decoders import VideoTokenScoreDecoder, unpatchify_video
from lisa_control.zoo.wan import (
    tiny_umt5,
    tiny_wan_vace_transformer,
    tiny_wan_vae,
    wan_scheduler,
)

BATCH, LATENT_FRAMES, LATENT, TEXT_DIM, TOKENS = 2, 2, 4, 16, 3
FRAMES, RESOLUTION = 5, 32  # pixel clips: 4k + 1 frames, 8x the latent size
CONTROL_CHANNELS = 2 * 4 + 8 * 8


# ----------------------------------------------------------------------------- builders


@pytest.fixture(scope="module")
def model() -> MainModel:
    """A latent Wan VACE model without text: transformer, causal VAE, UniPC flow scheduler."""
    return MainModel(
        main_network=tiny_wan_vace_transformer(seed=5),
        scheduler=wan_scheduler(),
        family=get_family("wan_vace"),
        vae=tiny_wan_vae(seed=6),
        resolution=RESOLUTION,
        objective="flow",
    )


def make_branch(transformer=None) -> WanVACEBranch:
    """A new VACE part (zero projections) on a copy of the model's transformer."""
    if transformer is None:
        transformer = tiny_wan_vace_transformer(seed=5)
    return WanVACEBranch(transformer, WanVACESideNetwork.new_for(transformer))


def text_context(seed: int = 0, batch: int = BATCH) -> Context:
    g = torch.Generator().manual_seed(seed)
    return Context(encoder_hidden_states=torch.randn(batch, TOKENS, TEXT_DIM, generator=g))


def video_batch(seed: int = 0):
    """x0, control latents, noise and fixed timesteps (1000 s)."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(BATCH, 4, LATENT_FRAMES, LATENT, LATENT, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    control = torch.randn(BATCH, CONTROL_CHANNELS, LATENT_FRAMES, LATENT, LATENT, generator=g)
    return x0, control, noise, torch.tensor([250.0, 812.5])


def randomize_zero_parameters(module: torch.nn.Module, seed: int = 0) -> None:
    """Small random values for every all-zero parameter, so every path carries gradient."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def grads(loss, params):
    return torch.autograd.grad(loss, params, allow_unused=True)


def text_to_video_transformer(transformer: WanVACETransformer3DModel) -> WanTransformer3DModel:
    """The Wan text-to-video transformer a VACE transformer extends: its config and weights
    without the VACE part."""
    config = {k: v for k, v in transformer.config.items() if not k.startswith(("_", "vace_"))}
    plain = WanTransformer3DModel(**config)
    state = {k: v for k, v in transformer.state_dict().items() if not k.startswith("vace_")}
    plain.load_state_dict(state)
    return plain.eval()


def raw_prediction(branch, x_t, timesteps, ctx, control):
    """The stock transformer with the side network's weights in its VACE part, and the Wan
    text-to-video transformer with the main network's weights, straight from diffusers."""
    main = branch.main_network
    vace_weights = dict(branch.side_network.named_parameters())
    output = torch.func.functional_call(
        main,
        vace_weights,
        (),
        dict(
            hidden_states=x_t,
            timestep=timesteps,
            encoder_hidden_states=ctx.encoder_hidden_states,
            control_hidden_states=control,
            return_dict=False,
        ),
    )[0]
    with torch.no_grad():
        prior = text_to_video_transformer(main)(
            x_t, timesteps, ctx.encoder_hidden_states, return_dict=False
        )[0]
    return output, prior


# ----------------------------------------------------------------------------- registration


def test_the_family_is_registered_with_its_vace_layers(model):
    from lisa_control.families import family_of_network, family_of_pipeline

    family = get_family("wan_vace")
    assert family.network_class is WanVACETransformer3DModel and family.takes_video
    assert family.side_networks == {"controlnet": WanVACEBranch}
    assert family_of_network(model.main_network) is family
    assert family_of_pipeline("WanVACEPipeline") is family
    assert family_of_pipeline("WanPipeline").name == "unet"  # text-to-video Wan is not this family
    branch = make_branch(model.main_network)
    assert branch.layer_names() == ["vace_0", "vace_1", "vace_2"]
    assert branch.default_lisa_layer() == "vace_1"
    ref = resolve_layer(branch.side_network, "vace_2")
    assert ref.module is branch.side_network.vace_blocks[2].proj_out and ref.reads_input
    assert heavy_blocks(branch.side_network) == list(branch.side_network.vace_blocks)
    assert model.vae_scale_factor == 8 and model.resolution_multiple == 16
    assert family.latent_condition_channels(model) == CONTROL_CHANNELS == branch.condition_channels


# ----------------------------------------------------------------------------- LISA


def test_loss_and_gradients_match_the_raw_formula(model):
    branch = make_branch()
    lisa = lisa_for_branch(branch, sample_size=LATENT)
    assert isinstance(lisa.decoder, VideoTokenScoreDecoder) and lisa.layer == "vace_1"
    randomize_zero_parameters(branch.side_network, seed=1)
    randomize_zero_parameters(lisa.decoder, seed=2)
    objective = model.family.training_objective(model, "flow")
    step = ControlTrainingStep(branch, objective, [lisa]).train()
    ctx = text_context()
    x0, control, noise, timesteps = video_batch()
    side_names, side_params = zip(*branch.side_network.named_parameters())
    decoder_names, decoder_params = zip(*lisa.decoder.named_parameters())
    params = [*side_params, *decoder_params]
    names = [*side_names, *(f"decoder.{n}" for n in decoder_names)]

    out = step(x0, ctx, control, noise=noise, timesteps=timesteps)
    got = grads(out.loss, params)

    lisa.remove_hooks()
    captured = []  # the raw pass runs the main network's modules with the side's weights
    hooked = branch.main_network.vace_blocks[1].proj_out
    handle = hooked.register_forward_pre_hook(lambda m, args: captured.append(args[0]))
    s = (timesteps / 1000).reshape(-1, 1, 1, 1, 1)
    x_t, target = (1 - s) * x0 + s * noise, noise - x0
    output, prior = raw_prediction(branch, x_t, timesteps, ctx, control)
    handle.remove()
    assert captured[0].shape == (BATCH, LATENT_FRAMES * (LATENT // 2) ** 2, 16)
    decoded = lisa.decoder(captured[0], timesteps)
    aux = ((decoded - (target - prior)) ** 2).mean()
    expected_loss = F.mse_loss(output, target) + 0.2 * aux
    expected = grads(expected_loss, params)

    torch.testing.assert_close(out.loss, expected_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.logs["aux_loss"], aux.detach(), rtol=1e-6, atol=1e-7)
    for name, a, b in zip(names, got, expected):
        assert a is not None and b is not None, name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)
    side_grads, decoder_grads = got[: len(side_params)], got[len(side_params) :]
    assert all(g.any() for g in side_grads) and all(g.any() for g in decoder_grads)


def test_the_decoder_lays_tokens_out_as_the_transformer_does():
    """The transformer's own output head gives (B, f h w, pt ph pw C) tokens and its output:
    ``unpatchify_video`` turns the first into the second. The decoder starts at zero."""
    transformer = tiny_wan_vace_transformer(seed=5)
    tokens = []
    handle = transformer.proj_out.register_forward_hook(lambda m, a, out: tokens.append(out))
    x0, control, _, timesteps = video_batch()
    with torch.no_grad():
        video = transformer(x0, timesteps, text_context().encoder_hidden_states, None, control)[0]
    handle.remove()
    grid = (LATENT_FRAMES, LATENT // 2, LATENT // 2)
    assert torch.equal(unpatchify_video(tokens[0], grid, (1, 2, 2)), video)

    decoder = VideoTokenScoreDecoder(16, 4, (1, 2, 2), grid_size=LATENT // 2)
    features = torch.randn(BATCH, LATENT_FRAMES * (LATENT // 2) ** 2, 16)
    assert torch.count_nonzero(decoder(features, timesteps)) == 0
    randomize_zero_parameters(decoder, seed=3)
    decoded = decoder(features, timesteps)
    assert decoded.shape == x0.shape
    features[1, 1 * 4 + 3] = 5.0  # the token of frame 1, row 1, column 1 of video 1
    changed = (decoder(features, timesteps) - decoded).abs().amax(dim=1)  # (B, F, H, W)
    assert changed[1, 1, 2:, 2:].all() and changed.count_nonzero() == 4


def test_the_prior_is_the_text_to_video_transformer_and_a_new_side_starts_there(model):
    x0, control, noise, timesteps = video_batch()
    ctx = text_context()
    fresh = make_branch(model.main_network)
    with torch.no_grad():
        start = fresh(x0, timesteps, ctx, control, with_prior=True)
    torch.testing.assert_close(start.output, start.prior, rtol=0, atol=0)

    branch = make_branch(model.main_network)
    randomize_zero_parameters(branch.side_network, seed=4)
    with torch.no_grad():
        prediction = branch(x0, timesteps, ctx, control, with_prior=True)
        plain = text_to_video_transformer(model.main_network)(
            x0, timesteps, ctx.encoder_hidden_states, return_dict=False
        )[0]
        rows = branch(x0, timesteps, ctx, control, with_prior=True, prior_rows=torch.tensor([1]))
        off = branch(x0, timesteps, ctx, control, with_prior=True, conditioning_scale=0.0)
    assert (prediction.output - prediction.prior).abs().max() > 1e-3
    torch.testing.assert_close(prediction.prior, plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rows.prior, prediction.prior[1:], rtol=1e-5, atol=1e-6)
    # Scale 0 adds 0 h to every hint: the call is its own prior, the prior of no control.
    assert torch.equal(off.output, off.prior)
    assert torch.equal(off.prior, prediction.prior)


def test_the_main_network_stays_frozen_and_the_vace_part_trains(model):
    branch = make_branch()
    lisa = lisa_for_branch(branch, sample_size=LATENT)
    objective = model.family.training_objective(model, "flow")
    step = ControlTrainingStep(branch, objective, [lisa]).train()
    main_before = {k: v.clone() for k, v in branch.main_network.state_dict().items()}
    side_before = {k: v.clone() for k, v in branch.side_network.state_dict().items()}
    optimizer = torch.optim.AdamW(step.trainable_parameters(), lr=1e-3)
    lisa.check_optimizer(optimizer)
    x0, control, noise, timesteps = video_batch()
    for _ in range(3):  # the projections move first, then what feeds them
        optimizer.zero_grad()
        step(x0, text_context(), control, noise=noise, timesteps=timesteps).loss.backward()
        optimizer.step()

    assert not branch.main_network.training
    assert all(not p.requires_grad and p.grad is None for p in branch.main_network.parameters())
    for key, value in branch.main_network.state_dict().items():
        assert torch.equal(value, main_before[key]), key  # its own VACE part included
    # Every side weight moved, and the main network runs its own VACE part again.
    for key, value in branch.side_network.state_dict().items():
        assert not torch.equal(value, side_before[key]), key
    assert branch.main_network.vace_blocks is not branch.side_network.vace_blocks
    assert lisa.decoder.out.weight.abs().sum() > 0


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(model):
    """The side network's checkpointing covers the main blocks during the controlled call (they
    carry the hints) and is the main network's own again afterwards."""
    branch = make_branch()
    lisa = lisa_for_branch(branch, sample_size=LATENT)
    randomize_zero_parameters(branch.side_network, seed=5)
    randomize_zero_parameters(lisa.decoder, seed=6)
    step = ControlTrainingStep(branch, model.family.training_objective(model, "flow"), [lisa])
    params = [*branch.side_network.parameters(), *lisa.decoder.parameters()]
    x0, control, noise, timesteps = video_batch()
    checkpointed_blocks = []

    def checkpoint(block, *args):
        checkpointed_blocks.append(block)
        return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False)

    results = []
    for checkpointing in (False, True):
        if checkpointing:
            branch.side_network.enable_gradient_checkpointing(checkpoint)
        out = step.train()(x0, text_context(), control, noise=noise, timesteps=timesteps)
        results.append((out.loss.detach(), grads(out.loss, params)))
    # Once per block of the controlled call (4 main and 3 VACE blocks), none in the prior's.
    assert len(checkpointed_blocks) == 7 and not branch.main_network.gradient_checkpointing
    (plain_loss, plain), (checkpointed_loss, checkpointed) = results
    torch.testing.assert_close(checkpointed_loss, plain_loss, rtol=0, atol=0)
    for a, b in zip(checkpointed, plain):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


# ----------------------------------------------------------------------------- stock pipeline


def trained_side_network(model, folder):
    """Two optimizer steps with LISA on a new VACE part, then save."""
    branch = make_branch(model.main_network)
    lisa = lisa_for_branch(branch, sample_size=LATENT)
    step = ControlTrainingStep(branch, model.family.training_objective(model, "flow"), [lisa])
    optimizer = torch.optim.AdamW(step.trainable_parameters(), lr=1e-2)
    x0, control, noise, timesteps = video_batch()
    for _ in range(2):
        optimizer.zero_grad()
        step(x0, text_context(), control, noise=noise, timesteps=timesteps).loss.backward()
        optimizer.step()
    lisa.remove_hooks()
    branch.save_side_network(folder)
    return branch


def test_control_latents_are_the_pipelines(model):
    """``encode_condition`` builds what WanVACEPipeline builds from ``video=`` (no mask, no
    reference image): prepare_video_latents then prepare_masks."""
    pipe = WanVACEPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=model.vae,
        scheduler=wan_scheduler(),
        transformer=model.main_network,
    )
    g = torch.Generator().manual_seed(7)
    control = torch.rand(1, 3, FRAMES, RESOLUTION, RESOLUTION, generator=g)
    video = control * 2 - 1
    mask = torch.ones_like(video)
    with torch.no_grad():
        latents = pipe.prepare_video_latents(video, mask, [[]], device="cpu")
        expected = torch.cat([latents, pipe.prepare_masks(mask, [[]])], dim=1)
        ours = model.family.encode_condition(model.vae, control)
    assert ours.shape == (1, CONTROL_CHANNELS, LATENT_FRAMES, LATENT, LATENT)
    assert torch.equal(ours, expected)


def test_saved_side_network_drives_the_stock_pipeline_as_our_sampler(model, tmp_path):
    """The saved weights are the VACE part of a stock transformer: they load into one (read
    from a saved main network folder) with no key left over and only the VACE keys replaced;
    WanVACEPipeline with it, given the same latents, scheduler, prompt embeddings (with
    classifier-free guidance) and control video, ends at the latents our sampler ends at."""
    from lisa_control.eval.sampling import sample

    branch = trained_side_network(model, tmp_path / "vace")
    side = WanVACESideNetwork.from_pretrained(tmp_path / "vace")
    for key, value in branch.side_network.state_dict().items():
        assert torch.equal(side.state_dict()[key], value), key
    model.main_network.save_pretrained(tmp_path / "transformer")
    stock = WanVACETransformer3DModel.from_pretrained(tmp_path / "transformer")
    weights = load_file(tmp_path / "vace" / "diffusion_pytorch_model.safetensors")
    missing, unexpected = stock.load_state_dict(weights, strict=False)
    assert not unexpected and not any(k.startswith("vace_") for k in missing)
    assert stock.vace_blocks[0].proj_out.weight.abs().sum() > 0

    pipe = WanVACEPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=model.vae,
        scheduler=wan_scheduler(),
        transformer=stock,
    )
    pipe.set_progress_bar_config(disable=True)
    ctx, negative = text_context(seed=3, batch=1), text_context(seed=4, batch=1)
    g = torch.Generator().manual_seed(5)
    control = torch.rand(1, 3, FRAMES, RESOLUTION, RESOLUTION, generator=g)
    noise = torch.randn(1, 4, LATENT_FRAMES, LATENT, LATENT, generator=g)
    stock_latents = pipe(
        prompt_embeds=ctx.encoder_hidden_states,
        negative_prompt_embeds=negative.encoder_hidden_states,
        video=control.transpose(1, 2),  # (batch, frames, channels, height, width)
        height=RESOLUTION,
        width=RESOLUTION,
        num_frames=FRAMES,
        num_inference_steps=3,
        guidance_scale=2.0,
        latents=noise,
        output_type="latent",
    ).frames

    ours = WanVACEBranch(model.main_network, side).eval()
    with torch.no_grad():
        condition = model.family.encode_condition(model.vae, control)
    latents = sample(
        ours,
        condition,
        ctx,
        wan_scheduler(),
        num_inference_steps=3,
        guidance_scale=2.0,
        negative_context=negative,
        latents=noise.clone(),
    )
    assert (latents - noise).abs().max() > 0.1
    torch.testing.assert_close(latents, stock_latents, rtol=1e-4, atol=1e-5)
    # The shared-module transformer is the stock one, without a copy.
    joined = transformer_with_vace_part(model.main_network, side)
    assert joined.vace_blocks is side.vace_blocks and joined.blocks is model.main_network.blocks
    x0, control_latents, _, timesteps = video_batch()
    with torch.no_grad():
        a = joined(x0, timesteps, text_context().encoder_hidden_states, None, control_latents)[0]
        b = stock(x0, timesteps, text_context().encoder_hidden_states, None, control_latents)[0]
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------- lisa train


def write_gif(path, frames):
    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=125, loop=0)


def moving_gradient(count: int, size: int, seed: int) -> list[np.ndarray]:
    """Smooth frames (they survive GIF palettes) that change from frame to frame."""
    y, x = np.mgrid[0:size, 0:size]
    frames = []
    for k in range(count):
        level = (x * 6 + y * 3 + 20 * k + seed * 50) % 256
        frames.append(np.stack([level, 255 - level, np.full_like(level, 80)], -1).astype(np.uint8))
    return frames


@pytest.fixture(scope="module")
def wan_folder(model, tmp_path_factory):
    """A WanVACEPipeline folder with a tiny UMT5 and a tokenizer built in code (a stand-in for
    UMT5's), and a video folder of four captioned clips with their control clips."""
    from transformers import CLIPTextModel

    root = tmp_path_factory.mktemp("wan")
    _, tokenizer = tiny_clip(root / "vocab", CLIPTextModel)
    WanVACEPipeline(
        tokenizer=tokenizer,
        text_encoder=tiny_umt5(seed=8, hidden_size=TEXT_DIM),
        vae=model.vae,
        scheduler=model.scheduler,
        transformer=model.main_network,
    ).save_pretrained(root / "model")
    data = root / "data"
    data.mkdir()
    rows = []
    for k in range(4):
        write_gif(data / f"v{k}.gif", moving_gradient(FRAMES, RESOLUTION, seed=k))
        write_gif(data / f"c{k}.gif", moving_gradient(FRAMES, RESOLUTION, seed=k + 4)[::-1])
        rows.append({"video": f"v{k}.gif", "conditioning_video": f"c{k}.gif", "text": f"clip {k}"})
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "model", data


def test_a_wan_vace_folder_loads_with_its_text_encoder(wan_folder):
    from lisa_control.families.encoders import FrozenEncoders
    from lisa_control.families.loading import load_main_model

    folder, _ = wan_folder
    loaded = load_main_model(str(folder))
    assert loaded.family.name == "wan_vace" and loaded.has_text and loaded.vae_scale_factor == 8
    context = FrozenEncoders(loaded, "cpu").prompt_context(["a cat", ""])
    pipe = loaded.prompt_encoder.pipe
    expected, _ = pipe.encode_prompt(
        ["a cat", ""], do_classifier_free_guidance=False, max_sequence_length=512
    )
    assert context.encoder_hidden_states.shape == (2, 512, TEXT_DIM)
    assert torch.equal(context.encoder_hidden_states, expected)
    assert loaded.family.guidance(loaded, None) == (5.0, None)


def train_argv(folder, data, out, steps, *extra):
    flags = dict(
        pretrained_model_name_or_path=folder, train_data_dir=data, num_frames=FRAMES,
        resolution=RESOLUTION, train_batch_size=2, max_train_steps=steps, checkpointing_steps=2,
        validation_steps=0, learning_rate=1e-3, seed=0, output_dir=out, report_to="none",
    )  # fmt: skip
    argv = ["train"]
    for key, value in flags.items():
        argv += [f"--{key}", str(value)]
    return argv + ["--no-progress", *extra]


def losses(out):
    return [json.loads(line) for line in (out / "loss_log.jsonl").read_text().splitlines()]


def test_lisa_train_on_a_wan_vace_folder_resumes_bit_exactly(wan_folder, tmp_path):
    """`lisa train` on a WanVACEPipeline folder and a video folder: UMT5 captions, VACE control
    latents, LISA; stopping after 2 steps and resuming gives the same 4 losses; the output is a
    side network whose weights load into the folder's transformer."""
    from lisa_control.cli import main

    folder, data = wan_folder
    full, broken = tmp_path / "full", tmp_path / "broken"
    assert main(train_argv(folder, data, full, 4)) == 0
    assert main(train_argv(folder, data, broken, 2)) == 0
    resume = ("--resume_from_checkpoint", "latest")
    assert main(train_argv(folder, data, broken, 4, *resume)) == 0
    reference, resumed = losses(full), losses(broken)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in reference]
    assert all(r["aux_loss"] > 0 for r in reference)

    side = WanVACESideNetwork.from_pretrained(full / "controlnet")
    assert side.vace_blocks[0].proj_out.weight.abs().sum() > 0
    stock = WanVACETransformer3DModel.from_pretrained(folder / "transformer")
    missing, unexpected = stock.load_state_dict(side.state_dict(), strict=False)
    assert not unexpected and not any(k.startswith("vace_") for k in missing)


# ----------------------------------------------------------------------------- drawing videos


def gif_frames(path) -> list[np.ndarray]:
    with Image.open(path) as gif:
        frames = []
        for k in range(gif.n_frames):
            gif.seek(k)
            frames.append(np.asarray(gif.convert("RGB")))
    return frames


def stock_wan_pipeline(folder, side_network_folder, text: bool = True) -> WanVACEPipeline:
    """diffusers' WanVACEPipeline read from ``folder`` with the saved VACE part loaded into its
    transformer, as a user of the stock pipeline would run a trained side network."""
    parts = {} if text else {"tokenizer": None, "text_encoder": None}
    pipe = WanVACEPipeline.from_pretrained(folder, **parts)
    weights = load_file(side_network_folder / "diffusion_pytorch_model.safetensors")
    pipe.transformer.load_state_dict(weights, strict=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_sample_shape_and_decoding_undo_the_vaes_encoding(model):
    """Clips of 4k + 1 frames draw noise of k + 1 latent frames at 1/8 the size; decoding
    undoes the per-channel normalisation as WanVACEPipeline does (dividing by the reciprocal
    std), then runs the causal VAE on the whole clip."""
    from lisa_control.eval.sampling import decode

    family = model.family
    assert model.sample_shape(RESOLUTION, 48, FRAMES) == (4, LATENT_FRAMES, LATENT, 6)
    assert model.sample_shape(RESOLUTION, RESOLUTION, 9) == (4, 3, LATENT, LATENT)
    g = torch.Generator().manual_seed(2)
    latents = torch.randn(1, 4, LATENT_FRAMES, LATENT, LATENT, generator=g)
    normalized = family.normalize_latents(model.vae, latents)
    torch.testing.assert_close(family.denormalize_latents(model.vae, normalized), latents)
    shape = (1, 4, 1, 1, 1)
    mean = torch.tensor(model.vae.config.latents_mean).view(shape)
    inverse_std = 1.0 / torch.tensor(model.vae.config.latents_std).view(shape)
    with torch.no_grad():
        expected = model.vae.decode(normalized / inverse_std + mean, return_dict=False)[0]
        video = decode(model.vae, normalized, family)
    assert video.shape == (1, 3, FRAMES, RESOLUTION, RESOLUTION)
    assert torch.equal(video, expected.clamp(-1, 1))


def test_our_sampler_draws_the_stock_pipelines_frames_without_text(model, tmp_path):
    """A Wan VACE model without a text encoder has no stock pipeline in SideNetworkSampler
    (what `lisa sample` and `lisa eval` run), so our sampler draws: the noise of the sample
    shape, the model's own scheduler and the family's decoding. From the same seed it gives the
    frames WanVACEPipeline decodes, given the null context as prompt embeddings."""
    from lisa_control.eval.generate import SideNetworkSampler

    trained_side_network(model, tmp_path / "vace")
    folder = tmp_path / "model"
    WanVACEPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=model.vae,
        scheduler=model.scheduler,
        transformer=model.main_network,
    ).save_pretrained(folder)
    sampler = SideNetworkSampler(model, tmp_path / "vace", num_inference_steps=2, device="cpu")
    assert sampler.pipeline is None
    g = torch.Generator().manual_seed(9)
    controls = torch.rand(2, 3, FRAMES, RESOLUTION, RESOLUTION, generator=g)
    ours = sampler(controls, ["", ""], seed=4, batch_size=2)
    assert ours.shape == (2, 3, FRAMES, RESOLUTION, RESOLUTION)
    assert (ours[:, :, 0] - ours[:, :, -1]).abs().max() > 0  # the frames differ

    pipe = stock_wan_pipeline(folder, tmp_path / "vace", text=False)
    null = model.null_context(1).encoder_hidden_states
    for row in range(2):
        frames = pipe(
            prompt_embeds=null,
            video=controls[row : row + 1].transpose(1, 2),
            height=RESOLUTION,
            width=RESOLUTION,
            num_frames=FRAMES,
            num_inference_steps=2,
            guidance_scale=1.0,
            generator=torch.Generator().manual_seed(condition_seed(4, row)),
            output_type="np",
        ).frames
        stock = torch.from_numpy(frames).movedim(-1, 1) * 2 - 1  # (1, 3, F, H, W)
        torch.testing.assert_close(ours[row : row + 1], stock, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def wan_run(wan_folder, tmp_path_factory):
    """`lisa train` for 2 steps on pose_video clips of 5 frames, validating at step 2."""
    from lisa_control.cli import main

    folder, _ = wan_folder
    out = tmp_path_factory.mktemp("wan_run") / "out"
    argv = ["train", "--pretrained_model_name_or_path", str(folder), "--task", "pose_video",
            "--num_frames", str(FRAMES), "--resolution", str(RESOLUTION),
            "--train_batch_size", "2", "--max_train_steps", "2", "--checkpointing_steps", "2",
            "--validation_steps", "2", "--validation_conditions", "2",
            "--num_validation_images", "1", "--validation_inference_steps", "2", "--seed", "0",
            "--output_dir", str(out), "--report_to", "none", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    return out


def test_validation_during_a_wan_run_logs_scores_and_writes_its_preview(wan_run):
    """Validation draws Wan videos: the task's scores in validation.jsonl, and an animation of
    5 frames, one row per held-out clip (condition | sample | ground truth), with its sheet."""
    records = [json.loads(line) for line in (wan_run / "validation.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2]
    assert {"pck", "temporal_consistency", "motion_error"} <= set(records[0])
    cell = RESOLUTION + 2  # a frame and its gutter
    frames = gif_frames(wan_run / "validation" / "step-2.gif")
    assert len(frames) == FRAMES and frames[0].shape == (2 + 2 * cell, 2 + 3 * cell, 3)
    with Image.open(wan_run / "validation" / "step-2_frames.png") as sheet:
        assert sheet.size == (2 + FRAMES * cell, 2 + 6 * cell)


def test_lisa_sample_on_a_wan_run_writes_the_stock_pipelines_frames(wan_folder, wan_run, tmp_path):
    """`lisa sample` with a control GIF: a GIF of --num_frames frames at --resolution, whose
    frames are those of diffusers' WanVACEPipeline (read from the folder, the side network's
    weights loaded into its transformer) called with the same seed, prompt and control frames,
    written by the same GIF writer; the frame sheet holds them losslessly."""
    from lisa_control.cli import main
    from lisa_control.eval.video import save_gif, video_to_uint8

    folder, data = wan_folder
    out = tmp_path / "samples"
    argv = ["sample", "--pretrained_model_name_or_path", str(folder),
            "--controlnet", str(wan_run / "controlnet"), "--image", str(data / "c0.gif"),
            "--prompt", "a walk", "--num_frames", str(FRAMES), "--resolution", str(RESOLUTION),
            "--num_inference_steps", "2", "--seed", "3", "--output_dir", str(out)]  # fmt: skip
    assert main(argv) == 0
    ours = gif_frames(out / "c0.gif")
    assert len(ours) == FRAMES and ours[0].shape == (RESOLUTION, RESOLUTION, 3)

    pipe = stock_wan_pipeline(folder, wan_run / "controlnet")
    with Image.open(data / "c0.gif") as gif:
        control = []
        for k in range(FRAMES):
            gif.seek(k)
            control.append(gif.convert("RGB"))
    frames = pipe(
        "a walk",
        video=control,
        height=RESOLUTION,
        width=RESOLUTION,
        num_frames=FRAMES,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(3),
        output_type="np",
    ).frames
    stock = video_to_uint8(torch.from_numpy(frames).movedim(-1, 1) * 2 - 1)[0]
    assert any(np.any(stock[0] != f) for f in stock[1:])  # a moving video
    save_gif([Image.fromarray(f) for f in stock], tmp_path / "stock.gif")
    for a, b in zip(ours, gif_frames(tmp_path / "stock.gif")):
        assert np.array_equal(a, b)
    cell = RESOLUTION + 2
    with Image.open(out / "grid_frames.png") as sheet:
        samples = np.asarray(sheet.convert("RGB"))[2 + cell : 2 + cell + RESOLUTION]
    for f in range(FRAMES):
        assert np.array_equal(samples[:, 2 + f * cell : 2 + f * cell + RESOLUTION], stock[f])


def test_lisa_eval_on_a_wan_run_scores_a_video_folder(wan_folder, wan_run, tmp_path):
    """`lisa eval` on the run's side network and a video test folder: the model and clip length
    come from the run; the task-feature video Fréchet distance, an animation and a sheet."""
    from lisa_control.cli import main

    _, data = wan_folder
    out = tmp_path / "eval"
    argv = ["eval", "--controlnet", str(wan_run / "controlnet"), "--test_data_dir", str(data),
            "--num_inference_steps", "2", "--feature_train_steps", "5", "--feature_pool", "16",
            "--feature_reference_size", "16", "--output_dir", str(out),
            "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["data"]["num_frames"] == FRAMES and report["data"]["rows"] == 4
    assert report["metrics"]["video_frechet_distance"] > 0
    assert len(gif_frames(out / "samples.gif")) == FRAMES


# ----------------------------------------------------------------------------- bad input


def one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message
    return message


def test_bad_input_is_one_clear_line(model):
    branch = make_branch(model.main_network)
    x0, control, _, timesteps = video_batch()
    ctx = text_context()
    cases = [
        ((x0, timesteps, ctx, control[:, :, :1]), "has 1 latent frames but the sample has 2"),
        ((x0, timesteps, ctx, control[..., :2, :2]), "give the control video the clip's height"),
        ((x0, timesteps, ctx, control[:, :8]), "must be VACE control latents"),
        ((x0[:, :, 0], timesteps, ctx, control), "denoises latent videos"),
        ((x0, timesteps, ctx, control[:1]), "got 1 control videos for 2 samples"),
    ]
    for args, message in cases:
        with pytest.raises(ConfigError, match=message) as exc_info:
            branch(*args)
        one_line(exc_info)
    family = model.family
    with pytest.raises(ConfigError, match=r"encodes 4k \+ 1 frames .* got 8; use --num_frames 5"):
        family.encode_condition(model.vae, torch.rand(1, 3, 8, RESOLUTION, RESOLUTION))
    with pytest.raises(ConfigError, match="got 6; use --num_frames 5"):
        family.encode_images(model.vae, torch.rand(1, 3, 6, RESOLUTION, RESOLUTION))
    with pytest.raises(ConfigError, match="got 8; use --num_frames 5 .or 9."):
        model.sample_shape(RESOLUTION, RESOLUTION, 8)
    with pytest.raises(ConfigError, match="generates videos, and the conditions are still") as e:
        model.sample_shape(RESOLUTION, RESOLUTION)
    one_line(e)
    with pytest.raises(ConfigError, match="pass sample_size") as exc_info:
        lisa_for_branch(branch)
    one_line(exc_info)
    other = tiny_wan_vace_transformer(seed=1, vace_layers=(0, 2))
    with pytest.raises(ModelError, match="vace_layers is \\[0, 2\\] in the VACE side network"):
        WanVACEBranch(model.main_network, WanVACESideNetwork.new_for(other))
    from lisa_control.families.wan_vace import check_vae_fits_transformer

    with pytest.raises(ModelError, match="makes 80-channel VACE control latents") as exc_info:
        check_vae_fits_transformer(tiny_wan_vae(latent_channels=8), model.main_network)
    one_line(exc_info)

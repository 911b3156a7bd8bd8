"""Video: the animatediff family (UNetMotionModel + per-frame ControlNet or SparseCtrl), the
``pose_video`` task, video folders, and video outputs of sampling.

The branches are checked against the formulas written out here with diffusers' own calls and
the AnimateDiff pipelines' reshapes (frames flattened batch-major, text repeated per frame), and
the saved side networks against diffusers' stock AnimateDiff pipelines.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    SparseControlNetModel,
    UNetMotionModel,
)
from factories import tiny_clip
from PIL import Image

from lisa_control.core.branch import Context
from lisa_control.core.hooks import resolve_layer
from lisa_control.core.objectives import DiffusionObjective
from lisa_control.core.step import ControlTrainingStep
from lisa_control.families import get_family
from lisa_control.families.animatediff import (
    AnimateDiffControlNetBranch,
    AnimateDiffSparseControlNetBranch,
    FrameScoreDecoder,
    from_frames,
    to_frames,
)
from lisa_control.regularizers.decoders import ScoreDecoder
from lisa_control.regularizers.lisa import lisa_for_branch
from lisa_control.zoo.video import tiny_unet_motion

BATCH, FRAMES, LATENT, CONTEXT_DIM, TOKENS = 2, 4, 8, 16, 3
SPARSE_FRAMES = [0, 2]
BRANCHES = {
    "controlnet": AnimateDiffControlNetBranch,
    "sparse_controlnet": AnimateDiffSparseControlNetBranch,
}


# ----------------------------------------------------------------------------- builders


def motion_unet(seed: int = 5) -> UNetMotionModel:
    """Latent-space motion UNet: 4 channels, 8 x 8 latents, 16-d text."""
    return tiny_unet_motion(seed=seed, sample_size=LATENT, in_channels=4)


def make_branch(kind: str, unet=None):
    """Condition at twice the latent size, as the 2x VAE below gives; SparseCtrl on fixed frames
    (its random training subsets are tested on their own)."""
    unet = unet or motion_unet()
    if kind == "sparse_controlnet":
        return AnimateDiffSparseControlNetBranch.from_main(
            unet, condition_downscale=2, frame_indices=SPARSE_FRAMES, random_training_frames=False
        )
    return AnimateDiffControlNetBranch.from_main(unet, condition_downscale=2)


def text_context(seed: int = 0, batch: int = BATCH) -> Context:
    g = torch.Generator().manual_seed(seed)
    return Context(encoder_hidden_states=torch.randn(batch, TOKENS, CONTEXT_DIM, generator=g))


def video_batch(seed: int = 0):
    """x0, condition, noise and fixed timesteps; every frame differs."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(BATCH, 4, FRAMES, LATENT, LATENT, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    condition = torch.rand(BATCH, 3, FRAMES, 2 * LATENT, 2 * LATENT, generator=g)
    return x0, condition, noise, torch.tensor([130, 870])


def randomize_zero_parameters(module: torch.nn.Module, seed: int = 0) -> None:
    """Small random values for every all-zero parameter, so every path carries gradient."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def grads(loss, params):
    return torch.autograd.grad(loss, params, allow_unused=True)


# ----------------------------------------------------------------------------- raw formulas


def raw_controlnet(branch, x_t, timesteps, ctx, condition):
    """As AnimateDiffControlNetPipeline: frames flattened by transpose(1, 2) + reshape, the text
    repeated per frame, residuals into the UNetMotionModel as they are."""
    side, main = branch.side_network, branch.main_network
    b, c, f, h, w = x_t.shape
    frames = torch.transpose(x_t, 1, 2).reshape(-1, c, h, w)
    cond = torch.transpose(condition, 1, 2).reshape(-1, condition.shape[1], *condition.shape[3:])
    states = ctx.encoder_hidden_states.repeat_interleave(f, dim=0)
    down, mid = side(
        frames,
        timesteps.repeat_interleave(f),
        encoder_hidden_states=states,
        controlnet_cond=cond,
        return_dict=False,
    )
    output = main(
        x_t,
        timesteps,
        encoder_hidden_states=states,
        down_block_additional_residuals=down,
        mid_block_additional_residual=mid,
    ).sample
    with torch.no_grad():
        prior = main(x_t, timesteps, encoder_hidden_states=states).sample
    return output, prior


def raw_sparse(branch, x_t, timesteps, ctx, condition, indices=SPARSE_FRAMES):
    """As AnimateDiffSparseControlNetPipeline.prepare_sparse_control_conditioning: zeros with
    the given frames at their indices, a mask that is 1 there."""
    side, main = branch.side_network, branch.main_network
    b, _, f, h, w = condition.shape
    sparse = torch.zeros_like(condition)
    sparse[:, :, indices] = condition[:, :, indices]
    mask = torch.zeros(b, 1, f, h, w)
    mask[:, :, indices] = 1
    states = ctx.encoder_hidden_states.repeat_interleave(f, dim=0)
    down, mid = side(
        x_t,
        timesteps,
        encoder_hidden_states=states,
        controlnet_cond=sparse,
        conditioning_mask=mask,
        return_dict=False,
    )
    output = main(
        x_t,
        timesteps,
        encoder_hidden_states=states,
        down_block_additional_residuals=down,
        mid_block_additional_residual=mid,
    ).sample
    with torch.no_grad():
        prior = main(x_t, timesteps, encoder_hidden_states=states).sample
    return output, prior


RAW = {"controlnet": raw_controlnet, "sparse_controlnet": raw_sparse}


def raw_decode(decoder, feature, timesteps, num_frames):
    """Frame f of video b is feature row b * F + f, decoded with video b's timestep, placed at
    [b, :, f]: one ScoreDecoder call per frame."""
    videos = []
    for b in range(timesteps.shape[0]):
        frames = [
            ScoreDecoder.forward(decoder, feature[b * num_frames + f][None], timesteps[b : b + 1])[
                0
            ]
            for f in range(num_frames)
        ]
        videos.append(torch.stack(frames, dim=1))  # (C, F, H, W)
    return torch.stack(videos)


# ----------------------------------------------------------------------------- layouts


def test_frame_layout_is_the_pipelines_and_the_motion_unets():
    video = torch.randn(2, 3, 5, 4, 6)
    frames = to_frames(video)
    # AnimateDiffControlNetPipeline's reshape of x_t for the ControlNet
    expected = torch.transpose(video, 1, 2).reshape(-1, 3, 4, 6)
    assert torch.equal(frames, expected)
    assert torch.equal(frames[1 * 5 + 3], video[1, :, 3])
    # UNetMotionModel's reshape of its output back to the video
    back = frames[None, :].reshape((-1, 5) + frames.shape[1:]).permute(0, 2, 1, 3, 4)
    assert torch.equal(from_frames(frames, 5), back) and torch.equal(back, video)


def test_the_family_is_registered_with_both_side_networks():
    family = get_family("animatediff")
    assert family.network_class is UNetMotionModel and family.network_folder == "unet"
    assert family.side_networks == BRANCHES
    from lisa_control.families import family_of_network, family_of_pipeline

    assert family_of_network(motion_unet()) is family
    assert family_of_pipeline("AnimateDiffControlNetPipeline") is family
    assert family_of_pipeline("StableDiffusionPipeline").name == "unet"


# ----------------------------------------------------------------------------- LISA


@pytest.mark.parametrize("kind", BRANCHES)
def test_loss_and_gradients_match_the_raw_formula(kind):
    branch = make_branch(kind)
    lisa = lisa_for_branch(branch)
    assert isinstance(lisa.decoder, FrameScoreDecoder)
    assert lisa.layer == "down_2"  # the middle zero projection of a two-block ControlNet
    randomize_zero_parameters(branch.side_network, seed=1)
    randomize_zero_parameters(lisa.decoder, seed=2)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    step = ControlTrainingStep(branch, DiffusionObjective(scheduler, "epsilon"), [lisa]).train()
    ctx = text_context()
    x0, condition, noise, timesteps = video_batch()
    side_names, side_params = zip(*branch.side_network.named_parameters())
    decoder_names, decoder_params = zip(*lisa.decoder.named_parameters())
    params = [*side_params, *decoder_params]
    names = [*side_names, *(f"decoder.{n}" for n in decoder_names)]

    out = step(x0, ctx, condition, noise=noise, timesteps=timesteps)
    got = grads(out.loss, params)

    lisa.remove_hooks()
    captured = []
    hooked = resolve_layer(branch.side_network, lisa.layer).module
    handle = hooked.register_forward_pre_hook(lambda m, args: captured.append(args[0]))
    abar = scheduler.alphas_cumprod[timesteps].reshape(-1, 1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    output, prior = RAW[kind](branch, x_t, timesteps, ctx, condition)
    handle.remove()
    assert captured[0].shape[0] == BATCH * FRAMES
    decoded = raw_decode(lisa.decoder, captured[0], timesteps, FRAMES)
    aux = ((decoded - (noise - prior)) ** 2).mean()
    expected_loss = F.mse_loss(output, noise) + 0.2 * aux
    expected = grads(expected_loss, params)

    torch.testing.assert_close(out.loss, expected_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.logs["aux_loss"], aux.detach(), rtol=1e-6, atol=1e-7)
    for name, a, b in zip(names, got, expected):
        if a is None or b is None:
            assert a is None and b is None, name
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)
    side_grads, decoder_grads = got[: len(side_params)], got[len(side_params) :]
    assert sum(g is not None and bool(g.any()) for g in side_grads) > len(side_grads) // 2
    assert all(g is not None and g.any() for g in decoder_grads)


def test_the_decoder_places_each_frame_at_its_video_and_frame():
    """A feature that is nonzero on one frame only decodes to a prediction that differs from the
    zero feature's on that frame of that video only."""
    branch = make_branch("controlnet")
    lisa = lisa_for_branch(branch)
    randomize_zero_parameters(lisa.decoder, seed=3)
    channels = branch.side_network.controlnet_down_blocks[2].in_channels
    feature = torch.zeros(BATCH * FRAMES, channels, LATENT // 2, LATENT // 2)
    timesteps = torch.tensor([100, 100])
    base = lisa.decoder(feature, timesteps)
    feature[1 * FRAMES + 2] = 1.0
    changed = (lisa.decoder(feature, timesteps) - base).abs().amax(dim=(1, 3, 4))  # (B, F)
    assert base.shape == (BATCH, 4, FRAMES, LATENT, LATENT)
    assert changed[1, 2] > 0 and changed.count_nonzero() == 1


@pytest.mark.parametrize("kind", BRANCHES)
def test_zero_side_network_starts_at_the_prior_and_the_main_network_stays_frozen(kind):
    branch = make_branch(kind)
    lisa = lisa_for_branch(branch)
    step = ControlTrainingStep(
        branch, DiffusionObjective(DDPMScheduler(), "epsilon"), [lisa]
    ).train()
    x0, condition, noise, timesteps = video_batch()
    with torch.no_grad():
        batch = step.objective.sample(x0, noise=noise, timesteps=timesteps)
        prediction = branch(batch.x_t, timesteps, text_context(), condition, with_prior=True)
    torch.testing.assert_close(prediction.output, prediction.prior, rtol=0, atol=0)
    main_before = {k: v.clone() for k, v in branch.main_network.state_dict().items()}
    side_before = {k: v.clone() for k, v in branch.side_network.state_dict().items()}
    optimizer = torch.optim.AdamW(step.trainable_parameters(), lr=1e-3)
    for _ in range(2):  # the zero projections move first, then everything before them
        optimizer.zero_grad()
        step(x0, text_context(), condition, noise=noise, timesteps=timesteps).loss.backward()
        optimizer.step()
    assert not branch.main_network.training
    assert all(not p.requires_grad and p.grad is None for p in branch.main_network.parameters())
    for key, value in branch.main_network.state_dict().items():
        assert torch.equal(value, main_before[key]), key
    changed = {
        k for k, v in branch.side_network.state_dict().items() if not torch.equal(v, side_before[k])
    }
    assert any(k.startswith("controlnet_down_blocks") for k in changed)
    assert lisa.decoder.out.weight.abs().sum() > 0


def test_sparse_training_frames_are_random_subsets_drawn_from_the_global_seed():
    branch = AnimateDiffSparseControlNetBranch.from_main(motion_unet(), condition_downscale=2)
    condition = torch.rand(64, 3, FRAMES, 4, 4)
    torch.manual_seed(7)
    first = branch.train().frame_mask(condition)
    torch.manual_seed(7)
    assert torch.equal(branch.frame_mask(condition), first)
    counts = first.sum(1)
    assert set(first.unique().tolist()) == {0.0, 1.0} and counts.min() >= 1
    assert len(set(counts.tolist())) > 2  # different numbers of conditioned frames
    # In eval mode: the branch's frame_indices, by default every frame.
    assert torch.equal(branch.eval().frame_mask(condition), torch.ones(64, FRAMES))
    only = branch.frame_mask(condition, frame_indices=[1, 3])
    assert only[:, [1, 3]].all() and not only[:, [0, 2]].any()


# ----------------------------------------------------------------------------- stock pipelines


def tiny_vae() -> AutoencoderKL:
    """2x downsampling: 16 px frames, 8 x 8 latents."""
    torch.manual_seed(20)
    return AutoencoderKL(
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
    )


@pytest.fixture(scope="module")
def latent_model(tmp_path_factory):
    """A latent AnimateDiff model: motion UNet, 2x VAE, a 16-d CLIP text encoder."""
    from transformers import CLIPTextModel

    from lisa_control.families import MainModel

    torch.manual_seed(21)
    text_encoder, tokenizer = tiny_clip(tmp_path_factory.mktemp("clip"), CLIPTextModel)
    return MainModel(
        main_network=motion_unet(),
        scheduler=DDPMScheduler(num_train_timesteps=1000),
        family=get_family("animatediff"),
        vae=tiny_vae(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        resolution=2 * LATENT,
    )


def trained_side_network(kind, model, folder):
    """Two optimizer steps with LISA (so every zero projection has moved), then save."""
    branch = make_branch(kind, model.main_network)
    lisa = lisa_for_branch(branch)
    step = ControlTrainingStep(branch, DiffusionObjective(model.scheduler, "epsilon"), [lisa])
    optimizer = torch.optim.AdamW(step.trainable_parameters(), lr=1e-2)
    x0, condition, noise, timesteps = video_batch()
    for _ in range(2):
        optimizer.zero_grad()
        step(x0, text_context(), condition, noise=noise, timesteps=timesteps).loss.backward()
        optimizer.step()
    lisa.remove_hooks()
    branch.save_side_network(folder)
    return branch


STOCK = {"controlnet": ControlNetModel, "sparse_controlnet": SparseControlNetModel}


@pytest.mark.filterwarnings("ignore:Passing `image` as a list of 4d:FutureWarning")
@pytest.mark.parametrize("kind", BRANCHES)
def test_saved_side_network_drives_the_stock_pipeline_as_our_sampler(kind, latent_model, tmp_path):
    """The saved side network loads in its stock class; diffusers' AnimateDiff pipeline, given
    the same initial latents, scheduler and prompt embeddings (with classifier-free guidance),
    ends at the latents our sampler ends at."""
    from lisa_control.eval.sampling import sample

    branch = trained_side_network(kind, latent_model, tmp_path / kind)
    side = STOCK[kind].from_pretrained(tmp_path / kind)
    for key, value in branch.side_network.state_dict().items():
        assert torch.equal(side.state_dict()[key], value), key
    assert side.controlnet_down_blocks[0].weight.abs().sum() > 0

    scheduler = DPMSolverMultistepScheduler.from_config(latent_model.scheduler.config)
    stock = latent_model.family.stock_pipeline(latent_model, side, scheduler)
    stock.set_progress_bar_config(disable=True)
    if kind == "sparse_controlnet":
        stock.frame_indices = SPARSE_FRAMES
    ctx, negative = text_context(seed=3, batch=1), text_context(seed=4, batch=1)
    condition = torch.rand(
        1, 3, FRAMES, 2 * LATENT, 2 * LATENT, generator=torch.Generator().manual_seed(5)
    )
    noise = torch.randn(1, 4, FRAMES, LATENT, LATENT, generator=torch.Generator().manual_seed(6))
    video = condition[0]
    if kind == "sparse_controlnet":  # a list of image batches: (1, C, H, W) each
        frames = [video[None, :, f] for f in SPARSE_FRAMES]
    else:  # a list of (C, H, W) frames
        frames = [video[:, f] for f in range(FRAMES)]
    extra = {"controlnet_frame_indices": SPARSE_FRAMES} if kind == "sparse_controlnet" else {}
    stock_latents = stock.pipeline(
        prompt_embeds=ctx.encoder_hidden_states,
        negative_prompt_embeds=negative.encoder_hidden_states,
        num_frames=FRAMES,
        height=2 * LATENT,
        width=2 * LATENT,
        conditioning_frames=frames,
        num_inference_steps=3,
        guidance_scale=2.0,
        latents=noise,
        output_type="latent",
        **extra,
    ).frames

    ours = make_branch(kind, latent_model.main_network)
    ours.side_network = side
    latents = sample(
        ours.eval(),
        condition,
        ctx,
        DPMSolverMultistepScheduler.from_config(latent_model.scheduler.config),
        num_inference_steps=3,
        guidance_scale=2.0,
        negative_context=negative,
        latents=noise.clone(),
    )
    assert latents.shape == (1, 4, FRAMES, LATENT, LATENT)
    assert (latents - noise).abs().max() > 0.1
    torch.testing.assert_close(latents, stock_latents, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", BRANCHES)
def test_lisa_sample_path_gives_the_stock_pipelines_frames(kind, latent_model, tmp_path):
    """SideNetworkSampler (what `lisa sample` runs) through the stock pipeline and through our
    sampler, from the same per-condition noise and prompts: the same decoded frames."""
    from lisa_control.eval.generate import SideNetworkSampler
    from lisa_control.families.animatediff import StockVideoPipeline

    trained_side_network(kind, latent_model, tmp_path / kind)
    sampler = SideNetworkSampler(
        latent_model, tmp_path / kind, kind, num_inference_steps=2, guidance_scale=2.0, device="cpu"
    )
    assert isinstance(sampler.pipeline, StockVideoPipeline)
    g = torch.Generator().manual_seed(8)
    conditions = torch.rand(2, 3, FRAMES, 2 * LATENT, 2 * LATENT, generator=g)
    prompts = ["a cat", "two dogs"]
    stock = sampler(conditions, prompts, seed=3, batch_size=2)
    sampler.pipeline = None
    ours = sampler(conditions, prompts, seed=3, batch_size=2)
    assert stock.shape == (2, 3, FRAMES, 2 * LATENT, 2 * LATENT)
    assert (stock[:, :, 0] - stock[:, :, 1]).abs().max() > 0  # frames differ
    torch.testing.assert_close(ours, stock, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- pose_video


def video_tensors(samples):
    """Ground-truth videos (B, 3, F, H, W) in [-1, 1], as the dataset serves them."""
    return torch.stack(
        [torch.from_numpy(s.image.astype(np.float32)).movedim(-1, 0) / 127.5 - 1 for s in samples]
    )


@pytest.fixture(scope="module")
def pose_video():
    from lisa_control.data.tasks import get_task

    task = get_task("pose_video", resolution=32)
    return task, [task.sample(0, i) for i in range(12)]


def test_pose_video_renders_move_and_are_deterministic(pose_video):
    from lisa_control.data.tasks import TaskDataset, get_task

    task, samples = pose_video
    assert task.frames == 8
    s = samples[0]
    assert s.image.shape == (8, 32, 32, 3) and s.condition.shape == (8, 32, 32, 3)
    assert s.image.dtype == np.uint8 and s.meta["joints"].shape == (8, 14, 2)
    for s in samples:
        # Every frame differs from the one before, in the image, the condition and the joints.
        assert all(np.any(s.image[f] != s.image[f + 1]) for f in range(7))
        assert all(np.any(s.condition[f] != s.condition[f + 1]) for f in range(7))
        assert np.linalg.norm(np.diff(s.meta["joints"], axis=0), axis=-1).mean() > 0.5
    # The camera pans in some clips: the background moves, not only the figure.
    assert any(np.abs(s.meta["camera"][-1]).max() >= 1 for s in samples)
    again = get_task("pose_video", resolution=32).sample(0, 3)
    assert np.array_equal(again.image, samples[3].image) and again.caption == samples[3].caption
    assert np.array_equal(again.condition, samples[3].condition)
    assert not np.array_equal(task.sample(1, 3).image, samples[3].image)
    item = TaskDataset(task, size=4)[2]
    assert item["pixel_values"].shape == (3, 8, 32, 32)
    assert item["conditioning_pixel_values"].shape == (3, 8, 32, 32)
    assert torch.equal(item["pixel_values"], video_tensors([samples[2]])[0])
    long = get_task("pose_video", resolution=32, frames=16).sample(0, 0)
    assert long.image.shape[0] == 16


def test_pose_video_metrics_are_one_on_ground_truth_and_low_on_noise(pose_video):
    task, samples = pose_video
    truth = video_tensors(samples)
    perfect = task.fidelity(truth, samples)
    assert perfect["pck"] == 1.0 and perfect["temporal_consistency"] == 1.0
    assert perfect["detected"] == 1.0 and task.realism(truth) == 1.0
    noise = task.fidelity(torch.rand_like(truth) * 2 - 1, samples)
    assert noise["pck"] < 0.05 and noise["temporal_consistency"] < 0.05
    assert task.realism(torch.rand_like(truth) * 2 - 1) < 0.05
    # A frozen clip (its first frame repeated) and a clip whose frames are shuffled keep most
    # markers but lose the motion.
    frozen = task.fidelity(truth[:, :, :1].expand_as(truth), samples)
    assert frozen["temporal_consistency"] < 0.75 and frozen["pck"] < 0.9
    shuffled = task.fidelity(truth[:, :, [0, 4, 1, 6, 2, 7, 3, 5]], samples)
    assert shuffled["temporal_consistency"] < 0.5
    # Per-frame PCK: one blank frame out of eight costs an eighth.
    blank = truth.clone()
    blank[:, :, 3] = 0
    assert task.fidelity(blank, samples)["pck"] == pytest.approx(7 / 8)


def test_pose_video_refuses_what_it_cannot_render():
    from lisa_control.core.errors import ConfigError
    from lisa_control.data.tasks import get_task

    with pytest.raises(ConfigError, match="2 to 16 frames"):
        get_task("pose_video", frames=17)
    with pytest.raises(ConfigError, match="at least 32"):
        get_task("pose_video", resolution=16)
    with pytest.raises(ConfigError, match="no setting frames"):
        get_task("pose", frames=8)


# ----------------------------------------------------------------------------- lisa train / sample


@pytest.fixture(scope="module")
def pixel_video_model(tmp_path_factory):
    """A pixel-space motion UNet saved as `lisa pretrain` saves models, for pose_video: the
    trainer picks the family and the task from its folder."""
    from lisa_control.families.loading import save_pixel_model

    folder = tmp_path_factory.mktemp("video_model") / "model"
    unet = tiny_unet_motion(seed=0, sample_size=32)
    save_pixel_model(folder, unet, DDPMScheduler(), resolution=32, task="pose_video")
    return folder


def train_argv(model, out, steps, kind, *extra):
    flags = dict(
        pretrained_model_name_or_path=model, num_frames=4, train_batch_size=2,
        max_train_steps=steps, checkpointing_steps=2, validation_steps=2,
        validation_conditions=2, validation_inference_steps=2, learning_rate=1e-3, seed=0,
        output_dir=out, report_to="none", side_network=kind,
    )  # fmt: skip
    argv = ["train"]
    for key, value in flags.items():
        argv += [f"--{key}", str(value)]
    return argv + ["--no-progress", *extra]


def losses(out):
    return [json.loads(line) for line in (out / "loss_log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("kind", BRANCHES)
def test_lisa_train_pose_video_resumes_bit_exactly_and_validates_with_animations(
    kind, pixel_video_model, tmp_path
):
    """`lisa train` on a pose_video model folder: the family and task come from the folder;
    stopping after 2 steps and resuming gives the same 4 losses (SparseCtrl's random frame
    subsets included); validation writes a GIF and a frame sheet and scores the clips."""
    from PIL import Image

    from lisa_control.cli import main

    full, broken = tmp_path / "full", tmp_path / "broken"
    assert main(train_argv(pixel_video_model, full, 4, kind)) == 0
    assert main(train_argv(pixel_video_model, broken, 2, kind)) == 0
    resume = ("--resume_from_checkpoint", "latest")
    assert main(train_argv(pixel_video_model, broken, 4, kind, *resume)) == 0
    reference, resumed = losses(full), losses(broken)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in reference]
    assert all(r["aux_loss"] > 0 for r in reference)

    side = STOCK[kind].from_pretrained(full / "controlnet")
    assert side.controlnet_down_blocks[0].weight.abs().sum() > 0
    with Image.open(full / "validation" / "step-4.gif") as gif:
        assert gif.n_frames == 4  # condition | sample | ground truth, per frame
    with Image.open(full / "validation" / "step-4_frames.png") as sheet:
        # two conditions x (condition, sample, truth) lines of 4 frames of 32 px, 2 px gutters
        assert sheet.size == (2 + 4 * 34, 2 + 6 * 34)
    scores = [json.loads(line) for line in (full / "validation.jsonl").read_text().splitlines()]
    assert [s["step"] for s in scores] == [2, 4]
    assert {"pck", "temporal_consistency"} <= set(scores[0])


def test_lisa_sample_takes_condition_videos_and_writes_gifs_and_a_frame_sheet(
    pixel_video_model, tmp_path, capsys
):
    from PIL import Image

    from lisa_control.cli import main
    from lisa_control.data.tasks import get_task

    branch = AnimateDiffControlNetBranch.from_main(
        tiny_unet_motion(seed=0, sample_size=32), condition_downscale=1
    )
    randomize_zero_parameters(branch.side_network)
    branch.save_side_network(tmp_path / "controlnet")
    clip = get_task("pose_video", resolution=32, frames=4).sample(0, 0)
    frames = [Image.fromarray(f) for f in clip.condition]
    frames[0].save(tmp_path / "walk.gif", save_all=True, append_images=frames[1:], loop=0)
    (tmp_path / "frames").mkdir()
    for k, frame in enumerate(frames):
        frame.save(tmp_path / "frames" / f"{k:02d}.png")
    (tmp_path / "metadata.jsonl").write_text(
        json.dumps({"conditioning_video": "frames", "text": "walking"}) + "\n"
    )
    argv = [
        "sample", "--controlnet", str(tmp_path / "controlnet"),
        "--pretrained_model_name_or_path", str(pixel_video_model),
        "--image", str(tmp_path / "walk.gif"), str(tmp_path / "metadata.jsonl"),
        "--num_inference_steps", "2", "--output_dir", str(tmp_path / "out"),
    ]  # fmt: skip
    assert main(argv) == 0
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "frames.gif", "grid.gif", "grid_frames.png", "walk.gif"
    ]  # fmt: skip
    with Image.open(out / "walk.gif") as gif:
        assert gif.n_frames == 4 and gif.size == (32, 32)
        first = np.asarray(gif.convert("RGB"))
        gif.seek(3)
        assert np.any(np.asarray(gif.convert("RGB")) != first)  # an animation, not a still
    with Image.open(out / "grid_frames.png") as sheet:
        assert sheet.size == (2 + 4 * 34, 2 + 4 * 34)  # 2 conditions x (condition, sample)
    assert "2 video(s)" in capsys.readouterr().out


def test_frozen_encoders_encode_videos_frame_by_frame(latent_model):
    from lisa_control.families.encoders import FrozenEncoders

    encoders = FrozenEncoders(latent_model, "cpu")
    pixels = torch.rand(2, 3, FRAMES, 2 * LATENT, 2 * LATENT) * 2 - 1
    batch = {
        "pixel_values": pixels,
        "conditioning_pixel_values": torch.rand(2, 3, FRAMES, 2 * LATENT, 2 * LATENT),
        "caption": ["a", "b"],
    }
    torch.manual_seed(0)
    x0, ctx, condition = encoders.encode(batch)
    assert x0.shape == (2, 4, FRAMES, LATENT, LATENT)
    assert ctx.encoder_hidden_states.shape[0] == 2 and condition.shape == (2, 3, FRAMES, 16, 16)
    vae = latent_model.vae
    torch.manual_seed(0)
    frames = vae.encode(torch.transpose(pixels, 1, 2).reshape(-1, 3, 16, 16)).latent_dist.sample()
    expected = frames.reshape(2, FRAMES, 4, LATENT, LATENT).transpose(1, 2)
    torch.testing.assert_close(x0, expected * vae.config.scaling_factor)


# ----------------------------------------------------------------------------- video folders


def write_gif(path, frames):
    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=125, loop=0)


def write_mp4(path, frames, fps=24):
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def make_clip(count=6, size=(24, 32), seed=0):
    """Smooth frames (a moving gradient): they survive GIF palettes and H.264."""
    h, w = size
    y, x = np.mgrid[0:h, 0:w]
    frames = []
    for k in range(count):
        level = (x * 6 + y * 3 + 20 * k + seed * 50) % 256
        frames.append(np.stack([level, 255 - level, np.full_like(level, 80)], -1).astype(np.uint8))
    return frames


def make_video_folder(root, rows, files):
    """``files``: relative path -> list of frames (a GIF, an MP4, or a frame folder ending /)."""
    root.mkdir(parents=True, exist_ok=True)
    for name, frames in files.items():
        target = root / name.rstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith("/"):
            target.mkdir(exist_ok=True)
            for k, frame in enumerate(frames):
                Image.fromarray(frame).save(target / f"{k:03d}.png")
        elif name.endswith(".mp4"):
            write_mp4(target, frames)
        else:
            write_gif(target, frames)
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_video_folder_reads_gifs_frame_folders_and_mp4(tmp_path):
    from lisa_control.data.video_folder import VideoControlDataset

    clip = make_clip()
    rows = [
        {"video": "clips/a.gif", "conditioning_video": "poses/a/", "text": "a walk", "fps": 8},
        {"video": "clips/b.mp4", "conditioning_video": "poses/b.gif", "text": "b", "fps": 24},
    ]
    files = {"clips/a.gif": clip, "poses/a/": clip, "poses/b.gif": clip}
    if __import__("importlib").util.find_spec("av"):
        files["clips/b.mp4"] = clip
    else:
        rows = rows[:1]
    root = make_video_folder(tmp_path / "data", [dict(r) for r in rows], files)
    rows[0]["conditioning_video"] = "poses/a"
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = VideoControlDataset(root, resolution=16, num_frames=4, frame_stride=1)
    item = data[(3, 0)]
    assert item["pixel_values"].shape == (3, 4, 16, 16)
    assert item["conditioning_pixel_values"].shape == (3, 4, 16, 16)
    assert item["caption"] == "a walk" and item["index"] == 0
    assert item["pixel_values"].min() >= -1 and item["conditioning_pixel_values"].max() <= 1
    # Frame k of the clip is frame k of the item (a GIF and the frame folder hold the same).
    torch.testing.assert_close(
        item["pixel_values"] * 0.5 + 0.5, item["conditioning_pixel_values"], atol=0.02, rtol=0
    )
    assert (item["pixel_values"][:, 0] - item["pixel_values"][:, 1]).abs().max() > 0.05
    strided = VideoControlDataset(root, resolution=16, num_frames=3, frame_stride=2)[0]
    torch.testing.assert_close(strided["pixel_values"][:, 1], item["pixel_values"][:, 2])
    if len(rows) == 2:
        mp4 = data[1]["pixel_values"]
        # H.264 is lossy: the frames match the GIF's up to compression.
        assert (mp4 - data[0]["pixel_values"]).abs().mean() < 0.1
        by_rate = VideoControlDataset(root, resolution=16, num_frames=3, frame_rate=12)
        assert by_rate.frames(1)[2] == 2  # 24 fps at 12 fps: every second frame


def one_line_error(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message, message
    return message


BAD_VIDEO_CASES = {
    "unreadable": (
        {"video": "a.gif", "conditioning_video": "bad.gif", "text": "x"},
        r"cannot decode video .*bad\.gif",
    ),
    "frame_counts": (
        {"video": "a.gif", "conditioning_video": "short.gif", "text": "x"},
        r"the video 'a\.gif' has 6 frames but its condition 'short\.gif' has 3",
    ),
    "too_few_frames": (
        {"video": "short.gif", "conditioning_video": "short.gif", "text": "x"},
        r"the video 'short\.gif' has 3 frames, too few for 4 frames 1 apart",
    ),
    "fps_not_a_number": (
        {"video": "a.gif", "conditioning_video": "a.gif", "text": "x", "fps": "fast"},
        r"column 'fps' holds \"fast\" \(str\), not a number",
    ),
    "fps_negative": (
        {"video": "a.gif", "conditioning_video": "a.gif", "text": "x", "fps": -5},
        r"column 'fps' holds -5; a frame rate must be a positive number",
    ),
    "missing_file": (
        {"video": "a.gif", "conditioning_video": "nope.gif", "text": "x"},
        r"column 'conditioning_video' .*nope\.gif does not exist",
    ),
    "missing_column": (
        {"video": "a.gif", "text": "x"},
        r"has no column 'conditioning_video' for the condition videos",
    ),
    "not_a_video": (
        {"video": "a.gif", "conditioning_video": "notes.txt", "text": "x"},
        r"notes\.txt is not a video this reader knows",
    ),
}


@pytest.mark.parametrize("case", BAD_VIDEO_CASES)
def test_bad_video_input_is_one_clear_line(case, tmp_path):
    from lisa_control.core.errors import DataError
    from lisa_control.data.video_folder import VideoControlDataset

    row, pattern = BAD_VIDEO_CASES[case]
    root = make_video_folder(
        tmp_path / "data", [row], {"a.gif": make_clip(6), "short.gif": make_clip(3)}
    )
    (root / "bad.gif").write_bytes(b"GIF89a" + bytes(40))
    (root / "notes.txt").write_text("not a video")
    with pytest.raises(DataError) as exc_info:
        VideoControlDataset(root, resolution=16, num_frames=4)[0]
    assert __import__("re").search(pattern, one_line_error(exc_info)), str(exc_info.value)


def test_mp4_without_pyav_names_the_extra_and_a_wrong_fps_is_refused(tmp_path, monkeypatch):
    from lisa_control.core.errors import DataError
    from lisa_control.data import video_folder
    from lisa_control.data.video_folder import VideoControlDataset

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.mp4").write_bytes(b"\0" * 64)
    rows = [{"video": "a.mp4", "conditioning_video": "a.mp4", "text": "x"}]
    root = make_video_folder(tmp_path / "data", rows, {})
    monkeypatch.setattr(video_folder, "_pyav", lambda: None)
    with pytest.raises(DataError) as exc_info:
        VideoControlDataset(root, resolution=16, num_frames=2)[0]
    assert "needs PyAV: pip install 'lisa-control[video]'" in one_line_error(exc_info)
    monkeypatch.undo()

    pytest.importorskip("av")
    with pytest.raises(DataError) as exc_info:  # garbage bytes named .mp4
        VideoControlDataset(root, resolution=16, num_frames=2)[0]
    assert "cannot decode video" in one_line_error(exc_info)
    rows = [{"video": "b.mp4", "conditioning_video": "b.gif", "text": "x", "fps": 30}]
    root = make_video_folder(
        tmp_path / "other", rows, {"b.mp4": make_clip(4), "b.gif": make_clip(4)}
    )
    with pytest.raises(DataError) as exc_info:
        VideoControlDataset(root, resolution=16, num_frames=2)[0]
    message = one_line_error(exc_info)
    assert "says 30 fps but the video file records 24 fps" in message


def test_hf_dataset_with_video_columns(tmp_path):
    datasets = pytest.importorskip("datasets")
    from lisa_control.data.video_folder import VideoControlDataset

    clip = make_clip(5)
    write_gif(tmp_path / "a.gif", clip)
    frames = [Image.fromarray(f) for f in clip]
    table = datasets.Dataset.from_dict(
        {
            "video": [{"bytes": (tmp_path / "a.gif").read_bytes(), "path": None}],
            "conditioning_video": [frames],  # a list of frame images
            "text": ["from the hub"],
        },
        features=datasets.Features(
            {
                "video": {"bytes": datasets.Value("binary"), "path": datasets.Value("string")},
                "conditioning_video": datasets.Sequence(datasets.Image()),
                "text": datasets.Value("string"),
            }
        ),
    )
    table.save_to_disk(str(tmp_path / "hf"))
    item = VideoControlDataset(tmp_path / "hf", resolution=16, num_frames=5)[0]
    assert item["pixel_values"].shape == (3, 5, 16, 16) and item["caption"] == "from the hub"
    torch.testing.assert_close(
        item["pixel_values"] * 0.5 + 0.5, item["conditioning_pixel_values"], atol=0.02, rtol=0
    )


# ----------------------------------------------------------------------------- diffusers folders


def save_animatediff_folder(latent_model, folder, joined: bool):
    """An AnimateDiff pipeline folder as AnimateDiffPipeline.save_pretrained writes it; with
    ``joined=False``, unet/ holds the image UNet and motion_adapter/ the motion modules (the
    layout of a base model plus an adapter)."""
    from diffusers import AnimateDiffPipeline

    from lisa_control.families.animatediff import image_unet_of, motion_adapter_for

    unet = latent_model.main_network
    pipe = AnimateDiffPipeline(
        vae=latent_model.vae,
        text_encoder=latent_model.text_encoder,
        tokenizer=latent_model.tokenizer,
        unet=unet,
        motion_adapter=motion_adapter_for(unet),
        scheduler=DDPMScheduler(num_train_timesteps=1000),
    )
    pipe.save_pretrained(folder)
    if not joined:
        import shutil

        shutil.rmtree(folder / "unet")
        image_unet_of(unet).save_pretrained(folder / "unet")
    return folder


@pytest.mark.parametrize("joined", [True, False], ids=["unet_motion", "unet_and_adapter"])
def test_an_animatediff_folder_loads_as_the_video_family(latent_model, tmp_path, joined):
    from lisa_control.families.loading import load_main_model

    folder = save_animatediff_folder(latent_model, tmp_path / "model", joined)
    config = json.loads((folder / "unet" / "config.json").read_text())
    assert config["_class_name"] == ("UNetMotionModel" if joined else "UNet2DConditionModel")
    model = load_main_model(str(folder))
    assert model.family.name == "animatediff" and isinstance(model.main_network, UNetMotionModel)
    assert model.resolution == 2 * LATENT and model.vae is not None and model.has_text
    x = torch.randn(1, 4, FRAMES, LATENT, LATENT)
    states = torch.randn(FRAMES, TOKENS, CONTEXT_DIM)
    with torch.no_grad():
        expected = latent_model.main_network(x, 10, encoder_hidden_states=states).sample
        got = model.main_network(x, 10, encoder_hidden_states=states).sample
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_lisa_train_on_an_animatediff_folder_with_a_video_folder(latent_model, tmp_path):
    """Latent AnimateDiff + a metadata.jsonl of GIFs: VAE latents per frame, CLIP captions,
    two steps of LISA, a stock side network out."""
    from lisa_control.cli import main

    model = save_animatediff_folder(latent_model, tmp_path / "model", joined=True)
    rows = [
        {"video": f"v{k}.gif", "conditioning_video": f"c{k}.gif", "text": f"clip {k}"}
        for k in range(2)
    ]
    files = {}
    for k in range(2):
        files[f"v{k}.gif"] = make_clip(5, size=(16, 16), seed=k)
        files[f"c{k}.gif"] = make_clip(5, size=(16, 16), seed=k + 2)
    data = make_video_folder(tmp_path / "data", rows, files)
    out = tmp_path / "out"
    argv = [
        "train", "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data),
        "--num_frames", "4", "--resolution", "16", "--train_batch_size", "2",
        "--max_train_steps", "2", "--checkpointing_steps", "2", "--validation_steps", "0",
        "--output_dir", str(out), "--report_to", "none", "--no-progress", "--seed", "0",
    ]  # fmt: skip
    assert main(argv) == 0
    records = losses(out)
    assert [r["step"] for r in records] == [1, 2] and all(r["aux_loss"] > 0 for r in records)
    side = ControlNetModel.from_pretrained(out / "controlnet")
    assert side.config.conditioning_embedding_out_channels == [16, 32]  # 2x condition embedding


def test_video_tasks_and_models_must_match_in_one_line(pixel_video_model, tmp_path):
    from lisa_control.core.errors import ConfigError
    from lisa_control.training.build import build_dataset, load_model
    from lisa_control.training.config import TrainConfig

    shipped = load_model(TrainConfig(task="pose_video", output_dir=str(tmp_path)))
    assert shipped.family.takes_video and shipped.task == "pose_video"  # embedded:pose_video
    model = load_model(TrainConfig(pretrained_model_name_or_path=str(pixel_video_model)))
    with pytest.raises(ConfigError, match="renders images but the main network .* denoises videos"):
        build_dataset(TrainConfig(task="pose", output_dir=str(tmp_path)), model)
    dataset, resolution = build_dataset(TrainConfig(num_frames=5), model)  # the folder's task
    assert dataset.task.name == "pose_video" and dataset.task.frames == 5 and resolution == 32


def test_the_branches_refuse_inputs_that_are_not_videos_in_one_line():
    from lisa_control.core.errors import ModelError

    branch = make_branch("controlnet")
    x, condition, _, timesteps = video_batch()
    ctx = text_context()
    cases = [
        ((x[:, :, 0], timesteps, ctx, condition[:, :, 0]), "denoises videos"),
        ((x, timesteps, ctx, condition[:, :, :2]), "with the sample's 4 frames"),
        ((x, timesteps, ctx, condition[:, :1]), "has 1 channels but the side network expects 3"),
        (
            (x.repeat(1, 1, 5, 1, 1), timesteps, ctx, condition.repeat(1, 1, 5, 1, 1)),
            "take at most 16 frames, got 20",
        ),
    ]
    for args, message in cases:
        with pytest.raises(ModelError, match=message) as exc_info:
            branch(*args)
        assert "\n" not in str(exc_info.value)
    with pytest.raises(ModelError, match="does not fit the main network: block_out_channels"):
        AnimateDiffControlNetBranch(
            motion_unet(), make_branch("controlnet", tiny_unet_motion(
                sample_size=LATENT, in_channels=4, block_out_channels=(16, 16))).side_network
        )  # fmt: skip

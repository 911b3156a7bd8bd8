"""Composition of side networks: several side networks on one main network, their residuals
summed with per-network scales and guidance windows (``families/composition.py``).

Shown on tiny models built here: sampling a ``ComposedBranch`` gives what diffusers' own
multi-network pipelines give (UNet ControlNets, SD3, Flux, T2I-Adapters); a network at scale 0 or
with a window that excludes every step changes nothing; windows select exactly diffusers' steps;
mismatches are refused in one line; ``lisa train`` trains one side network per condition of the
two-condition task, with LISA on each, resumes bit-exactly and saves networks ``lisa sample``
composes. With LISA on part of the batch the composed prior covers the rows asked for, in every
family, and each network's LISA reads the one draw of rows; video side networks are refused.
"""

from __future__ import annotations

import json
from copy import deepcopy
from pathlib import Path

import numpy as np
import pytest
import test_lisa_subset as subset_tests
import torch
from diffusers import (
    ControlNetModel,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxControlNetPipeline,
    StableDiffusion3ControlNetPipeline,
    StableDiffusionAdapterPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from factories import make_pixel_model, make_sd_model
from PIL import Image
from test_flow_branches import (
    LATENT,
    CallRecorder,
    make_flux_branch,
    make_sd3_branch,
    make_t2i_branch,
    text_context,
    tiny_vae,
)

from lisa_control.cli import main
from lisa_control.core.branch import Context
from lisa_control.core.errors import ConfigError, ModelError
from lisa_control.eval.sampling import sample
from lisa_control.families import (
    FluxControlNetBranch,
    SD3ControlNetBranch,
    T2IAdapterBranch,
    UNetControlNetBranch,
)
from lisa_control.families.composition import ComposedBranch, keep
from lisa_control.families.flux import pack_latents, pipeline_schedule, unpack_latents
from lisa_control.zoo.flow import tiny_flux_controlnet, tiny_sd3_controlnet
from lisa_control.zoo.unet import tiny_unet

pytestmark = pytest.mark.filterwarnings("ignore:.*FluxPosEmbed.*:FutureWarning")

STEPS = 4


def perturb(module: torch.nn.Module, seed: int, amount: float = 0.05) -> torch.nn.Module:
    """Move every weight a little, so that zero projections carry each network's residuals."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(amount * torch.randn(p.shape, generator=g))
    return module


def assert_same(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-6) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=atol)


# ----------------------------------------------------------------------------- stock pipelines


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """A tiny Stable Diffusion pipeline and two ControlNets from its UNet, set apart."""
    pipe = StableDiffusionPipeline.from_pretrained(make_sd_model(tmp_path_factory.mktemp("sd")))
    nets = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        nets.append(perturb(ControlNetModel.from_unet(pipe.unet), seed))
    return pipe, nets


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_unet_controlnets_compose_as_the_stock_multi_controlnet_pipeline(sd, guidance_scale):
    pipe, nets = sd
    stock = StableDiffusionControlNetPipeline(
        **{k: v for k, v in pipe.components.items() if k != "image_encoder"}, controlnet=nets
    )
    stock.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    stock.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    conditions = [torch.rand(2, 3, 64, 64, generator=g) for _ in nets]
    latents = torch.randn(2, 4, 8, 8, generator=g)
    prompt, negative = torch.randn(2, 5, 16, generator=g), torch.randn(2, 5, 16, generator=g)
    controls = dict(conditioning_scale=[1.0, 0.7], control_guidance_start=[0.0, 0.25],
                    control_guidance_end=[1.0, 0.75])  # fmt: skip
    expected = stock(
        prompt_embeds=prompt,
        negative_prompt_embeds=negative,
        image=conditions,
        num_inference_steps=STEPS,
        guidance_scale=guidance_scale,
        latents=latents,
        output_type="latent",
        controlnet_conditioning_scale=controls["conditioning_scale"],
        control_guidance_start=controls["control_guidance_start"],
        control_guidance_end=controls["control_guidance_end"],
    ).images
    branch = ComposedBranch.from_side_networks(UNetControlNetBranch, pipe.unet, nets, **controls)
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    got = sample(
        branch,
        conditions,
        Context(prompt),
        scheduler,
        num_inference_steps=STEPS,
        guidance_scale=guidance_scale,
        negative_context=Context(negative),
        latents=latents * scheduler.init_noise_sigma,
    )
    assert_same(got, expected)


def test_sd3_controlnets_compose_as_the_stock_sd3_multi_controlnet_pipeline():
    branch = make_sd3_branch()
    transformer = branch.main_network
    nets = [perturb(branch.side_network, 1), perturb(tiny_sd3_controlnet(transformer, 3), 2)]
    pipe = StableDiffusion3ControlNetPipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(),
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
        text_encoder_3=None, tokenizer_3=None, controlnet=nets,
    )  # fmt: skip
    assert type(pipe.controlnet).__name__ == "SD3MultiControlNetModel"
    pipe.set_progress_bar_config(disable=True)
    ctx = text_context()
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(2, 4, LATENT, LATENT, generator=g)
    recorders = [CallRecorder(net) for net in nets]
    controls = dict(conditioning_scale=[0.8, 1.2], control_guidance_start=[0.0, 0.5],
                    control_guidance_end=[0.75, 1.0])  # fmt: skip
    expected = pipe(
        prompt_embeds=ctx.encoder_hidden_states,
        pooled_prompt_embeds=ctx.extra["pooled_projections"],
        control_image=[torch.rand(2, 3, 2 * LATENT, 2 * LATENT, generator=g) for _ in nets],
        height=2 * LATENT,
        width=2 * LATENT,
        num_inference_steps=STEPS,
        guidance_scale=1.0,
        latents=latents,
        output_type="latent",
        controlnet_conditioning_scale=controls["conditioning_scale"],
        control_guidance_start=controls["control_guidance_start"],
        control_guidance_end=controls["control_guidance_end"],
    ).images
    # The VAE-encoded control images, as each ControlNet received them.
    conditions = [r.calls[0][1]["controlnet_cond"] for r in recorders]
    for r in recorders:
        r.remove()
    composed = ComposedBranch.from_side_networks(SD3ControlNetBranch, transformer, nets, **controls)
    got = sample(composed, conditions, ctx, FlowMatchEulerDiscreteScheduler(),
                 num_inference_steps=STEPS, latents=latents)  # fmt: skip
    assert_same(got, expected)


def test_flux_controlnets_compose_as_the_stock_flux_multi_controlnet_pipeline():
    branch = make_flux_branch()
    transformer = branch.main_network
    nets = [perturb(branch.side_network, 1), perturb(tiny_flux_controlnet(transformer, 2, 2), 2)]
    pipe = FluxControlNetPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(shift_factor=0.0),
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
        transformer=transformer, controlnet=nets,
    )  # fmt: skip
    assert type(pipe.controlnet).__name__ == "FluxMultiControlNetModel"
    pipe.set_progress_bar_config(disable=True)
    ctx = text_context()
    g = torch.Generator().manual_seed(4)
    latents = torch.randn(2, 4, LATENT, LATENT, generator=g)
    recorders = [CallRecorder(net) for net in nets]
    controls = dict(conditioning_scale=[1.0, 0.6], control_guidance_start=[0.25, 0.0],
                    control_guidance_end=[1.0, 0.5])  # fmt: skip
    tokens = pipe(
        prompt_embeds=ctx.encoder_hidden_states,
        pooled_prompt_embeds=ctx.extra["pooled_projections"],
        control_image=[torch.rand(2, 3, 2 * LATENT, 2 * LATENT, generator=g) for _ in nets],
        height=2 * LATENT,
        width=2 * LATENT,
        num_inference_steps=STEPS,
        guidance_scale=3.5,
        latents=pack_latents(latents),
        output_type="latent",
        controlnet_conditioning_scale=controls["conditioning_scale"],
        control_guidance_start=controls["control_guidance_start"],
        control_guidance_end=controls["control_guidance_end"],
    ).images
    conditions = [
        unpack_latents(r.calls[0][1]["controlnet_cond"], LATENT, LATENT) for r in recorders
    ]
    for r in recorders:
        r.remove()
    composed = ComposedBranch.from_side_networks(
        FluxControlNetBranch, transformer, nets, **controls
    )
    scheduler = FlowMatchEulerDiscreteScheduler()
    got = sample(composed, conditions, ctx, scheduler, num_inference_steps=STEPS, latents=latents,
                 schedule=pipeline_schedule(scheduler, LATENT, LATENT, STEPS))  # fmt: skip
    assert_same(pack_latents(got), tokens)


def test_t2i_adapters_compose_as_the_stock_multi_adapter_pipeline():
    branch = make_t2i_branch()
    unet = branch.main_network
    torch.manual_seed(13)
    second = T2IAdapterBranch.from_main(unet, condition_downscale=2, num_res_blocks=1)
    adapters = [branch.side_network, second.side_network]
    pipe = StableDiffusionAdapterPipeline(
        vae=tiny_vae(), text_encoder=None, tokenizer=None, unet=unet, adapter=adapters,
        scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    assert type(pipe.adapter).__name__ == "MultiAdapter"
    pipe.set_progress_bar_config(disable=True)
    ctx = text_context()
    g = torch.Generator().manual_seed(5)
    conditions = [torch.rand(2, 3, 2 * LATENT, 2 * LATENT, generator=g) for _ in adapters]
    latents = torch.randn(2, 4, LATENT, LATENT, generator=g)
    expected = pipe(
        prompt_embeds=ctx.encoder_hidden_states,
        image=conditions,
        height=2 * LATENT,
        width=2 * LATENT,
        num_inference_steps=STEPS,
        guidance_scale=1.0,
        latents=latents,
        output_type="latent",
        adapter_conditioning_scale=[1.0, 0.6],
    ).images
    composed = ComposedBranch.from_side_networks(
        T2IAdapterBranch, unet, adapters, conditioning_scale=[1.0, 0.6]
    )
    scheduler = DDIMScheduler()
    got = sample(composed, conditions, ctx, scheduler, num_inference_steps=STEPS,
                 latents=latents * scheduler.init_noise_sigma)  # fmt: skip
    assert_same(got, expected)


# ----------------------------------------------------------------------------- scales and windows


@pytest.fixture(scope="module")
def pixel_pair():
    """A tiny pixel-space UNet and two ControlNets for it, set apart."""
    torch.manual_seed(0)
    config = tiny_unet(sample_size=16, block_out_channels=(16, 32), cross_attention_dim=16,
                       layers_per_block=1)  # fmt: skip
    unet = UNet2DConditionModel(**config)
    nets = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        branch = UNetControlNetBranch.from_main(unet, condition_downscale=1)
        nets.append(perturb(branch.side_network, seed))
    g = torch.Generator().manual_seed(6)
    conditions = [torch.rand(2, 3, 16, 16, generator=g) for _ in nets]
    latents = torch.randn(2, 3, 16, 16, generator=g)
    context = Context(torch.zeros(2, 1, 16))
    return unet, nets, conditions, latents, context


def run_sampler(branch, conditions, latents, context, steps=5):
    scheduler = DDIMScheduler()
    return sample(branch, conditions, context, scheduler, num_inference_steps=steps,
                  latents=latents * scheduler.init_noise_sigma)  # fmt: skip


@pytest.mark.parametrize(
    "controls",
    [
        dict(conditioning_scale=[1.0, 0.0]),
        # No step i of 5 has i / 5 >= 0.9 and (i + 1) / 5 <= 1: the window excludes every step.
        dict(control_guidance_start=[0.0, 0.9], control_guidance_end=[1.0, 1.0]),
    ],
    ids=["scale0", "closed_window"],
)
def test_a_network_at_scale_zero_or_outside_every_step_changes_nothing(pixel_pair, controls):
    unet, (a, b), (ca, cb), latents, context = pixel_pair
    alone = run_sampler(UNetControlNetBranch(unet, a), ca, latents, context)
    with_b = ComposedBranch.from_side_networks(UNetControlNetBranch, unet, [a, b], **controls)
    assert torch.equal(run_sampler(with_b, [ca, cb], latents, context), alone)
    one = ComposedBranch.from_side_networks(UNetControlNetBranch, unet, [a])
    assert torch.equal(run_sampler(one, [ca], latents, context), alone)
    # ... while B at scale 1 over every step does change the samples.
    both = ComposedBranch.from_side_networks(UNetControlNetBranch, unet, [a, b])
    assert not torch.allclose(run_sampler(both, [ca, cb], latents, context), alone, atol=1e-3)


def test_windows_select_exactly_the_steps_diffusers_documents(pixel_pair):
    """Network k acts at step i of n when i / n >= start_k and (i + 1) / n <= end_k."""
    unet, nets, conditions, latents, context = pixel_pair
    windows = [(0.0, 0.5), (0.3, 1.0)]
    steps = 10
    branch = ComposedBranch.from_side_networks(
        UNetControlNetBranch, unet, nets,
        control_guidance_start=[s for s, _ in windows],
        control_guidance_end=[e for _, e in windows],
    )  # fmt: skip
    calls = [0, 0]
    main_calls = []
    acted: list[list[int]] = [[], []]

    def counter(k):
        def hook(module, args):
            calls[k] += 1

        return hook

    handles = [net.register_forward_pre_hook(counter(k)) for k, net in enumerate(nets)]
    handles.append(unet.register_forward_pre_hook(lambda m, a: main_calls.append(list(calls))))
    run_sampler(branch, conditions, latents, context, steps=steps)
    for h in handles:
        h.remove()
    previous = [0, 0]
    for i, counts in enumerate(main_calls):
        for k in (0, 1):
            if counts[k] > previous[k]:
                acted[k].append(i)
        previous = counts
    assert acted[0] == [0, 1, 2, 3, 4]
    assert acted[1] == [3, 4, 5, 6, 7, 8, 9]
    for k, (start, end) in enumerate(windows):
        assert acted[k] == [i for i in range(steps) if keep(i, steps, start, end) == 1.0]


# ----------------------------------------------------------------------------- refusals


def test_mismatches_are_refused_in_one_line(pixel_pair):
    unet, (a, b), (ca, cb), latents, context = pixel_pair

    def refused(error, call, *words):
        with pytest.raises(error) as e:
            call()
        message = str(e.value)
        assert "\n" not in message
        for word in words:
            assert word in message, message

    torch.manual_seed(0)
    other_unet = UNet2DConditionModel(**tiny_unet(sample_size=16, block_out_channels=(8, 16),
                                                  cross_attention_dim=16, layers_per_block=1))
    foreign = UNetControlNetBranch.from_main(other_unet, condition_downscale=1).side_network
    refused(ModelError, lambda: ComposedBranch.from_side_networks(
        UNetControlNetBranch, unet, [a, foreign]), "does not fit the main network")  # fmt: skip
    adapter = T2IAdapterBranch.from_main(unet, condition_downscale=1).side_network
    refused(ModelError, lambda: ComposedBranch.from_side_networks(
        UNetControlNetBranch, unet, [a, adapter]), "one kind")  # fmt: skip
    refused(ModelError, lambda: ComposedBranch(
        [UNetControlNetBranch(unet, a), T2IAdapterBranch(unet, adapter)]), "one family and kind")
    copy = UNet2DConditionModel.from_config(unet.config)
    refused(ModelError, lambda: ComposedBranch(
        [UNetControlNetBranch(unet, a), UNetControlNetBranch(copy, b)]), "one main network")
    branch = ComposedBranch.from_side_networks(UNetControlNetBranch, unet, {"pose": a, "seg": b})
    x_t, t = latents, torch.tensor([10, 10])
    refused(ConfigError, lambda: branch(x_t, t, context, [ca]), "1 condition(s) for 2")
    refused(ConfigError, lambda: branch(x_t, t, context, ca), "one condition each")
    refused(ConfigError, lambda: branch(x_t, t, context, {"pose": ca, "depth": cb}), "named")
    refused(ModelError, lambda: branch(x_t, t, context, [ca, cb[:, :1]]), "(B, 3, H, W)")
    refused(ModelError, lambda: branch(x_t, t, context, [ca, cb[..., :8, :8]]), "needs (16, 16)")
    for key, values in [("conditioning_scale", [1.0, 0.5, 0.2]),
                        ("control_guidance_start", [0.0, 0.1, 0.2])]:  # fmt: skip
        refused(ConfigError, lambda key=key, values=values: ComposedBranch.from_side_networks(
            UNetControlNetBranch, unet, [a, b], **{key: values}), f"{key} has 3 values for 2")
    refused(ConfigError, lambda: ComposedBranch.from_side_networks(
        UNetControlNetBranch, unet, [a, b], control_guidance_start=[0.0, 0.6],
        control_guidance_end=[1.0, 0.6]), "start < end")  # fmt: skip
    refused(ConfigError, lambda: ComposedBranch.from_side_networks(
        UNetControlNetBranch, unet, {"a.b": a}), "letters, digits")  # fmt: skip


def test_sd3_networks_of_different_depths_are_refused():
    branch = make_sd3_branch()
    deeper = tiny_sd3_controlnet(branch.main_network, 2)
    composed = ComposedBranch.from_side_networks(
        SD3ControlNetBranch, branch.main_network, [branch.side_network, deeper]
    )
    x = torch.randn(2, 4, LATENT, LATENT)
    with pytest.raises(ModelError, match="give 3 and 2 residuals"):
        composed(x, torch.tensor([500.0, 500.0]), text_context(), [x, x])


# ----------------------------------------------------------------------------- two conditions


def task_images(samples) -> torch.Tensor:
    stacked = np.stack([s.image for s in samples]).astype(np.float32)
    return torch.from_numpy(stacked).permute(0, 3, 1, 2) / 127.5 - 1


def test_the_two_condition_task_scores_both_conditions_and_has_single_condition_views():
    from lisa_control.data.multi import select_task_conditions
    from lisa_control.data.tasks import TaskDataset, get_task

    task = get_task("pose_segmentation", resolution=32)
    samples = [task.sample(3, i) for i in range(16)]
    truth = task.fidelity(task_images(samples), samples)
    assert truth["pck"] == 1.0 and truth["miou"] == 1.0 and truth["fidelity"] == 1.0
    shuffled = task.fidelity(task_images(samples[1:] + samples[:1]), samples)
    assert shuffled["pck"] < 0.5 and shuffled["miou"] < 0.5
    assert set(samples[0].condition) == {"pose", "segmentation"}
    item = TaskDataset(task, size=4)[0]
    assert set(item["conditioning_pixel_values"]) == {"pose", "segmentation"}
    assert TaskDataset(task, size=4).condition_names == ("pose", "segmentation")
    for name, metric in (("pose", "pck"), ("segmentation", "miou")):
        view = select_task_conditions(task, name)
        assert view.metric_name == metric and view.conditions == (name,)
        sample = view.sample(3, 0)
        assert np.array_equal(sample.image, samples[0].image)
        assert np.array_equal(sample.condition, samples[0].condition[name])
    assert select_task_conditions(task, "conditioning_image").conditions == task.condition_names
    with pytest.raises(ConfigError, match="renders the conditions pose, segmentation"):
        select_task_conditions(task, ["pose", "depth"])


# ----------------------------------------------------------------------------- training


def train_argv(model, out, steps, *extra):
    argv = ["train", "--pretrained_model_name_or_path", model, "--task", "pose_segmentation",
            "--resolution", 16, "--train_batch_size", 2, "--max_train_steps", steps,
            "--checkpointing_steps", 2, "--validation_steps", 4, "--validation_conditions", 2,
            "--validation_inference_steps", 2, "--learning_rate", 1e-3, "--report_to", "none",
            "--output_dir", out, "--no-progress", *extra]  # fmt: skip
    return [str(a) for a in argv]


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def joint_run(tmp_path_factory):
    """Four steps of `lisa train` on both conditions of the two-condition task, with LISA."""
    root = tmp_path_factory.mktemp("joint")
    model = make_pixel_model(root / "model", resolution=16, task="pose_segmentation")
    out = root / "run"
    assert main(train_argv(model, out, 4)) == 0
    return model, out


def test_joint_training_trains_and_saves_one_network_per_condition_with_lisa_on_each(joint_run):
    from safetensors.torch import load_file

    _, out = joint_run
    log = read_log(out / "loss_log.jsonl")
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    for record in log:
        for side in ("pose", "segmentation"):
            keys = {f"{side}/aux_loss", f"{side}/aux_loss_ratio", f"{side}/lisa_loss"}
            assert keys <= set(record)
        assert record["lisa_loss"] == pytest.approx(
            record["pose/lisa_loss"] + record["segmentation/lisa_loss"], rel=1e-5
        )
    # Two decoders on two networks: their losses part after the first update.
    assert log[-1]["pose/aux_loss"] != log[-1]["segmentation/aux_loss"]
    for step in (2, 4):
        side = out / f"checkpoint-{step}" / "side_network"
        assert sorted(p.name for p in side.iterdir()) == ["pose", "segmentation"]
    for name in ("pose", "segmentation"):
        folder = out / "controlnet" / name
        assert ControlNetModel.from_pretrained(folder).config.conditioning_channels == 3
        keys = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
        assert not any("decoder" in k for k in keys)
    validation = read_log(out / "validation.jsonl")
    assert validation[-1]["step"] == 4 and {"pck", "miou", "fidelity"} <= set(validation[-1])
    assert (out / "validation" / "step-4.png").is_file()


def test_joint_training_resumes_bit_exactly(joint_run, tmp_path):
    from safetensors.torch import load_file

    model, reference = joint_run
    out = tmp_path / "resumed"
    assert main(train_argv(model, out, 2)) == 0
    assert main(train_argv(model, out, 4, "--resume_from_checkpoint", "latest")) == 0
    expected, got = read_log(reference / "loss_log.jsonl"), read_log(out / "loss_log.jsonl")
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for a, b in zip(expected, got):
        assert {k: v for k, v in a.items() if k != "step_seconds"} == {
            k: v for k, v in b.items() if k != "step_seconds"
        }
    for name in ("pose", "segmentation"):
        file = Path("controlnet") / name / "diffusion_pytorch_model.safetensors"
        wa, wb = load_file(str(reference / file)), load_file(str(out / file))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_joint_training_starts_from_saved_networks_one_folder_each(joint_run, tmp_path, capsys):
    from safetensors.torch import load_file

    model, run = joint_run
    out = tmp_path / "continued"
    start = ["--controlnet_model_name_or_path", run / "controlnet", "--learning_rate", 1e-12,
             "--regularizer", "none"]  # fmt: skip
    assert main(train_argv(model, out, 1, *start)) == 0
    for name in ("pose", "segmentation"):
        file = Path("controlnet") / name / "diffusion_pytorch_model.safetensors"
        before, after = load_file(str(run / file)), load_file(str(out / file))
        assert all(torch.allclose(before[k], after[k], atol=1e-6) for k in before)
    assert main(train_argv(model, tmp_path / "x", 1, "--controlnet_model_name_or_path",
                           run / "controlnet" / "pose")) == 2  # fmt: skip
    assert "has no folder 'pose'" in one_line_error(capsys)


def test_a_folder_with_two_condition_columns_trains_two_networks(tmp_path):
    from lisa_control.data.multi import MultiConditionDataset

    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    data.mkdir()
    rows = []
    for k in range(4):
        for kind in ("img", "pose", "seg"):
            pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(data / f"{kind}{k}.png")
        rows.append({"image": f"img{k}.png", "pose": f"pose{k}.png", "seg": f"seg{k}.png",
                     "text": ""})  # fmt: skip
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    dataset = MultiConditionDataset(data, conditioning_image_columns=["pose", "seg"], resolution=16)
    item = dataset[1]
    assert set(item["conditioning_pixel_values"]) == {"pose", "seg"}
    expected = np.asarray(Image.open(data / "seg1.png"), dtype=np.float32) / 255
    assert np.allclose(item["conditioning_pixel_values"]["seg"].permute(1, 2, 0).numpy(), expected,
                       atol=1e-6)  # fmt: skip
    from lisa_control.core.errors import DataError

    with pytest.raises(DataError, match="no column 'depth'"):
        MultiConditionDataset(data, conditioning_image_columns=["pose", "depth"], resolution=16)

    model = make_pixel_model(tmp_path / "model", resolution=16)
    out = tmp_path / "run"
    argv = ["train", "--pretrained_model_name_or_path", model, "--train_data_dir", data,
            "--conditioning_image_column", "pose", "seg", "--resolution", 16,
            "--train_batch_size", 2, "--max_train_steps", 2, "--validation_steps", 2,
            "--validation_image", data / "pose0.png", data / "seg0.png",
            "--num_validation_images", 1, "--validation_inference_steps", 2,
            "--regularizer", "none", "--report_to", "none", "--output_dir", out,
            "--no-progress"]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    assert sorted(p.name for p in (out / "controlnet").iterdir()) == ["pose", "seg"]
    assert (out / "validation" / "step-2.png").is_file()


# ----------------------------------------------------------------------------- lisa sample


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err and "Traceback" not in err, err
    return err


def save_png(array: np.ndarray, path: Path) -> Path:
    Image.fromarray(array).save(path)
    return path


@pytest.fixture(scope="module")
def conditions(tmp_path_factory):
    """Two held-out pose and segmentation conditions of the two-condition task, as files and as
    two folders."""
    from lisa_control.data.tasks import get_task

    root = tmp_path_factory.mktemp("conditions")
    task = get_task("pose_segmentation", resolution=16)
    for name in ("pose", "segmentation"):
        (root / name).mkdir()
    for i in range(2):
        s = task.sample(99, i)
        for name in ("pose", "segmentation"):
            save_png(s.condition[name], root / name / f"c{i}.png")
    return root


def test_lisa_sample_composes_networks_as_the_library_does(joint_run, conditions, tmp_path):
    from lisa_control.eval.conditions import load_condition_tensors, read_conditions
    from lisa_control.eval.generate import SideNetworkSampler
    from lisa_control.eval.images import to_uint8
    from lisa_control.families.loading import load_main_model

    model, run = joint_run
    nets = [run / "controlnet" / "pose", run / "controlnet" / "segmentation"]
    out = tmp_path / "samples"
    argv = ["sample", "--controlnet", *nets, "--pretrained_model_name_or_path", model,
            "--image", conditions / "pose", conditions / "segmentation",
            "--conditioning_scale", 1.0, 0.8, "--control_guidance_start", 0, 0.2,
            "--control_guidance_end", 1, 0.8, "--num_inference_steps", 3,
            "--output_dir", out]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["c0.png", "c1.png", "grid.png"]
    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.shape[1] > 3 * 16  # pose | segmentation | sample per row

    sampler = SideNetworkSampler(
        load_main_model(str(model)), nets, num_inference_steps=3, device="cpu",
        conditioning_scale=[1.0, 0.8], control_guidance_start=[0, 0.2],
        control_guidance_end=[1, 0.8],
    )  # fmt: skip
    tensors = [
        load_condition_tensors(read_conditions([conditions / name]), 16)
        for name in ("pose", "segmentation")
    ]
    images = to_uint8(sampler(tensors, ["", ""], seed=0))
    for i in range(2):
        assert np.array_equal(np.asarray(Image.open(out / f"c{i}.png")), images[i])
    alone = SideNetworkSampler(load_main_model(str(model)), nets[0], num_inference_steps=3,
                               device="cpu")  # fmt: skip
    assert not np.array_equal(to_uint8(alone(tensors[0], ["", ""], seed=0)), images)


def test_lisa_sample_composes_stable_diffusion_controlnets_through_the_stock_pipeline(sd, tmp_path):
    from diffusers import DPMSolverMultistepScheduler

    pipe, nets = sd
    folders = []
    for k, net in enumerate(nets):
        net.save_pretrained(tmp_path / f"cn{k}")
        folders.append(tmp_path / f"cn{k}")
    pipe.save_pretrained(tmp_path / "sd")
    g = np.random.default_rng(0)
    images = [save_png(g.integers(0, 256, (64, 64, 3), dtype=np.uint8), tmp_path / f"c{k}.png")
              for k in range(2)]  # fmt: skip
    controls = ["--conditioning_scale", 1.0, 0.7, "--control_guidance_start", 0, 0.5]
    out = tmp_path / "out"
    argv = ["sample", "--controlnet", *folders, "--pretrained_model_name_or_path", tmp_path / "sd",
            "--image", *images, "--prompt", "item", "--num_inference_steps", 2, "--seed", 5,
            "--output_dir", out, *controls]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    stock = StableDiffusionControlNetPipeline(
        **{k: v for k, v in pipe.components.items() if k != "image_encoder"}, controlnet=nets
    )
    stock.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    stock.set_progress_bar_config(disable=True)
    tensors = [torch.from_numpy(np.asarray(Image.open(p), dtype=np.float32) / 255)
               .permute(2, 0, 1)[None] for p in images]  # fmt: skip
    image = stock("item", image=tensors, num_inference_steps=2,
                  generator=torch.Generator().manual_seed(5), output_type="np",
                  controlnet_conditioning_scale=[1.0, 0.7], control_guidance_start=[0.0, 0.5],
                  control_guidance_end=[1.0, 1.0]).images[0]  # fmt: skip
    expected = (image * 255).round().astype(int)
    got = np.asarray(Image.open(out / "c0.png")).astype(int)
    assert np.abs(got - expected).max() <= 1


@pytest.mark.parametrize(
    "case,words",
    [
        ("one_image", "take --image values 2 at a time"),
        ("three_scales", "--conditioning_scale has 3 values for 2"),
        ("empty_window", "must satisfy 0 <= start < end <= 1"),
        ("adapter", "is a T2IAdapter but --side_network expects ControlNetModel"),
        ("foreign", "does not fit the main network"),
        ("uneven_folders", "give 2, 1 conditions"),
        ("one_column", "--conditioning_image_column with 2 names"),
    ],
)
def test_lisa_sample_refuses_mismatched_compositions_in_one_line(
    joint_run, conditions, tmp_path, capsys, case, words
):
    model, run = joint_run
    pose, seg = run / "controlnet" / "pose", run / "controlnet" / "segmentation"
    nets = [pose, seg]
    images = [conditions / "pose" / "c0.png", conditions / "segmentation" / "c0.png"]
    extra = []
    if case == "one_image":
        images = images[:1]
    elif case == "three_scales":
        extra = ["--conditioning_scale", 1, 1, 1]
    elif case == "empty_window":
        extra = ["--control_guidance_start", 0.5, "--control_guidance_end", 0.5]
    elif case == "adapter":
        from lisa_control.families.loading import load_main_model

        unet = load_main_model(str(model)).main_network
        T2IAdapterBranch.from_main(unet, condition_downscale=1).save_side_network(tmp_path / "a")
        nets = [pose, tmp_path / "a"]
    elif case == "foreign":
        torch.manual_seed(0)
        other = UNet2DConditionModel(**tiny_unet(sample_size=16, block_out_channels=(8, 16),
                                                 cross_attention_dim=16, layers_per_block=1))
        UNetControlNetBranch.from_main(other, condition_downscale=1).save_side_network(
            tmp_path / "f"
        )
        nets = [pose, tmp_path / "f"]
    elif case == "uneven_folders":
        (tmp_path / "one").mkdir()
        save_png(np.zeros((16, 16, 3), np.uint8), tmp_path / "one" / "x.png")
        images = [conditions / "pose", tmp_path / "one"]
    elif case == "one_column":
        (tmp_path / "meta").mkdir()
        (tmp_path / "meta" / "metadata.jsonl").write_text(
            json.dumps({"conditioning_image": str(images[0])}) + "\n"
        )
        images = [tmp_path / "meta"]
    out = tmp_path / "out"
    argv = ["sample", "--controlnet", *nets, "--pretrained_model_name_or_path", model,
            "--image", *images, "--num_inference_steps", 1, "--output_dir", out,
            *extra]  # fmt: skip
    assert main([str(a) for a in argv]) == 2
    assert words in one_line_error(capsys)
    assert not out.exists()


# ------------------------------------------------------------------------ LISA on part of the batch


def second_branch(branch):
    """Another side network of ``branch``'s kind on the same main network, set apart."""
    side = perturb(deepcopy(branch.side_network), 3)
    flags = {}
    if isinstance(branch, UNetControlNetBranch):
        flags = dict(shared_encoder_prior=branch.shared_encoder_prior,
                     batched_prior=branch.batched_prior)  # fmt: skip
    return type(branch)(branch.main_network, side, **flags)


@pytest.mark.parametrize("name", subset_tests.BRANCHES)
def test_the_composed_prior_on_rows_equals_those_rows_of_the_full_prior(name):
    first = subset_tests.BRANCHES[name]()
    branches = {"a": first, "b": second_branch(first)}
    composed = ComposedBranch(branches, conditioning_scale=[1.0, 0.5])
    x_t, t, context, condition = subset_tests.branch_inputs(name)
    conditions = [condition, condition.flip(0)]
    rows, no_rows = torch.tensor([1, 3]), torch.tensor([], dtype=torch.long)
    close = dict(rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        full = composed(x_t, t, context, conditions, with_prior=True)
        part = composed(x_t, t, context, conditions, with_prior=True, prior_rows=rows)
        none = composed(x_t, t, context, conditions, with_prior=True, prior_rows=no_rows)
        # No network acting: the main network alone, whose output is its own prior.
        off = composed(x_t, t, context, conditions, with_prior=True, prior_rows=rows,
                       conditioning_scale=0.0)  # fmt: skip
    assert full.prior_rows is None and full.prior.shape == x_t.shape
    assert part.prior_rows is rows and part.prior.shape == (2, *x_t.shape[1:])
    torch.testing.assert_close(part.prior, full.prior[rows], **close)
    torch.testing.assert_close(part.output, full.output, **close)
    assert none.prior_rows is no_rows and none.prior.shape == (0, *x_t.shape[1:])
    assert off.prior_rows is rows
    torch.testing.assert_close(off.prior, off.output[rows], rtol=0, atol=0)
    torch.testing.assert_close(off.prior, full.prior[rows], **close)


def test_lisa_on_part_of_the_batch_draws_one_choice_of_rows_for_every_side_network():
    """Each side network's LISA reads the rows the first copy draws, drawn once per step; the
    branch computes the prior for those rows only, and the aux losses are the ones read from
    the full prior on those rows."""
    from lisa_control import ControlTrainingStep, make_objective
    from lisa_control.regularizers.base import StepState
    from lisa_control.regularizers.per_network import PerSideNetwork

    first = subset_tests.unet_branch()
    composed = ComposedBranch({"a": first, "b": second_branch(first)})
    reg = PerSideNetwork({
        side: subset_tests.lisa(branch, batch_fraction=0.5, subset="random")
        for side, branch in composed.side_branches.items()
    })  # fmt: skip
    objective = make_objective("epsilon")
    x0, context, condition, noise, t = subset_tests.unet_inputs()
    conditions = [condition, condition.flip(0)]
    noised = objective.sample(x0, noise=noise, timesteps=t)
    torch.manual_seed(7)
    expected = reg.parts["a"].prior_rows(noised)
    after_one_draw = torch.get_rng_state()
    assert expected.numel() == 4 and not torch.equal(expected, torch.arange(4))

    calls = subset_tests.BranchCalls(composed)
    torch.manual_seed(7)
    out = ControlTrainingStep(composed, objective, [reg])(
        x0, context, conditions, noise=noise, timesteps=t
    )
    calls.handle.remove()
    assert torch.equal(torch.get_rng_state(), after_one_draw)
    assert len(calls.rows) == 1 and torch.equal(calls.rows[0], expected)
    with torch.no_grad():
        prediction = composed(noised.x_t, noised.timesteps, context, conditions, with_prior=True)
        reference = reg(StepState(noised, prediction, objective, rows=expected))
    for side in ("a", "b"):
        assert out.logs[f"{side}/aux_rows"] == 4
        torch.testing.assert_close(
            out.logs[f"{side}/aux_loss"], reference.logs[f"{side}/aux_loss"], rtol=1e-5, atol=0
        )


# ----------------------------------------------------------------------------- video families


def test_video_side_networks_are_refused_by_the_composed_branch():
    from lisa_control.families.animatediff import AnimateDiffControlNetBranch
    from lisa_control.zoo.video import tiny_unet_motion

    unet = tiny_unet_motion(seed=0, sample_size=16)
    branches = [AnimateDiffControlNetBranch.from_main(unet, condition_downscale=1)
                for _ in range(2)]  # fmt: skip
    with pytest.raises(ModelError, match="AnimateDiffControlNetBranch side networks cannot be"):
        ComposedBranch(branches)
    with pytest.raises(ModelError, match="video side networks run one at a time"):
        ComposedBranch.from_side_networks(
            AnimateDiffControlNetBranch, unet, [b.side_network for b in branches]
        )


@pytest.mark.parametrize(
    "extra,words",
    [
        (["--controlnet", "a", "b"], "2 --controlnet folders given"),
        (["--controlnet", "a", "--conditioning_scale", "0.5"], "--conditioning_scale given"),
    ],
)
def test_lisa_sample_refuses_to_compose_for_condition_videos(tmp_path, capsys, extra, words):
    frames = [Image.fromarray(np.full((16, 16, 3), v, np.uint8)) for v in (0, 255)]
    frames[0].save(tmp_path / "walk.gif", save_all=True, append_images=frames[1:], loop=0)
    argv = ["sample", *extra, "--image", str(tmp_path / "walk.gif"), "--output_dir",
            str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 2
    assert "video side networks are not composed" in (err := one_line_error(capsys))
    assert words in err and not (tmp_path / "out").exists()


def test_lisa_train_refuses_several_condition_columns_for_a_video_model(tmp_path):
    from types import SimpleNamespace

    from lisa_control.training.build import build_dataset
    from lisa_control.training.config import TrainConfig

    video_model = SimpleNamespace(
        resolution=32, family=SimpleNamespace(name="animatediff", takes_video=True)
    )
    cfg = TrainConfig(train_data_dir=str(tmp_path), conditioning_image_column=["pose", "seg"])
    with pytest.raises(ConfigError, match="video side networks are not composed"):
        build_dataset(cfg, video_model)


# ----------------------------------------------------------------------------- the benchmark


def test_benchmark_summary_reports_interference_and_paired_differences():
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import composition as bench

    def scores(pose_alone, seg_alone, composed, joint):
        def cell(pck, miou):
            return {"pck": pck, "miou": miou, "fidelity": (pck + miou) / 2}

        return {"prior": cell(0, 0.2), "pose_alone": cell(pose_alone, 0.3),
                "segmentation_alone": cell(0.1, seg_alone), "composed": cell(*composed),
                "joint_pose_alone": cell(0.5, 0.3), "joint_segmentation_alone": cell(0.1, 0.6),
                "joint_composed": cell(*joint)}  # fmt: skip

    raw = {
        "plain": {"0": scores(0.8, 0.7, (0.6, 0.5), (0.7, 0.6)),
                  "1": scores(0.8, 0.7, (0.4, 0.5), (0.5, 0.5))},
        "lisa": {"0": scores(0.9, 0.8, (0.8, 0.7), (0.8, 0.7)),
                 "1": scores(0.9, 0.8, (0.8, 0.8), (0.8, 0.8))},
    }  # fmt: skip

    class Args:
        regularizers, seeds, run_dir = ["plain", "lisa"], [0, 1], "/nonexistent"

    summary = bench.summarize(Args, raw)
    plain = summary["per_regularizer"]["plain"]["derived"]
    assert plain["pose_interference"]["mean"] == pytest.approx(0.3)  # 0.8 - (0.6, 0.4)
    assert plain["segmentation_interference"]["mean"] == pytest.approx(0.2)
    assert plain["joint_gain_pck"]["mean"] == pytest.approx(0.1)
    lisa = summary["per_regularizer"]["lisa"]["derived"]
    assert lisa["pose_interference"]["mean"] == pytest.approx(0.1)
    difference = summary["lisa_minus_plain"]
    assert difference["composed"]["pck"]["mean"] == pytest.approx(0.3)
    assert difference["derived"]["pose_interference"]["mean"] == pytest.approx(-0.2)
    assert summary["per_regularizer"]["plain"]["scores"]["composed"]["pck"]["n"] == 2

"""Step-time benchmark: what LISA costs per training step, against diffusers' reference loop.

One run on one GPU, SD2.1-base-shaped UNet and ControlNet with random weights (no downloads),
64x64x4 latents, 512x512 conditions, 77x1024 text context; the VAE and text encoder are left out
(the same inputs feed every variant, as with cached latents). Variants:

  A            diffusers' examples/controlnet/train_controlnet.py step, written out here: UNet in
               fp16 (--reference-dtype), ControlNet fp32 under accelerate-style autocast with
               fp32 outputs, GradScaler for fp16, clip 1.0, plain AdamW; PLUS the LISA authors'
               extra no-grad full UNet pass for the prior and the decoder loss at down_5.
  B            lisa_control's ControlTrainingStep, no regularizer: UNet in bf16, ControlNet fp32
               under bf16 autocast, SDPA attention, fused AdamW, clip 1.0.
  C            B + LikelihoodScoreAlignment at down_5 with the shared-encoder prior (default).
  C_fullprior  C with shared_encoder_prior=False (a second full UNet pass, as in A).
  C_batched    C with batched_prior=True (the two up paths as one 2B call).
  C_f0.5       C with the prior, the decoder and the aux loss on half of each batch
               (LikelihoodScoreAlignment(batch_fraction=0.5), ``lisa train
               --lisa_batch_fraction 0.5``): the prior's up path on B/2 rows.
  C_f0.25      the same on a quarter of each batch.
  C_t500       C with the aux loss on the rows with t in [500, 1000) and the prior on those
               rows only (timestep_range=(500, 1000), subset="timestep"): about B/2 rows under
               uniform timesteps, a different count every step.

B and all C variants share every speed option (--channels-last, --compile,
--gradient-checkpointing), so C/B is LISA's overhead and A/C the speed-up over the reference
with LISA; C_fullprior/B and C_batched/C decide the two prior options, C_f0.5/B, C_f0.25/B and
C_t500/B what LISA costs on part of the batch. (Under --compile, C_t500's varying row count makes
the prior's blocks recompile with dynamic shapes.)

Reported per variant and batch size: median step time over --steps timed steps after --warmup
(synchronize + perf_counter around each whole step, optimizer included), peak memory
(torch.cuda.max_memory_allocated, reset before building each variant, so it counts weights,
gradients, optimizer state and activations), FLOPs of one step counted with
torch.utils.flop_counter.FlopCounterMode (at the first batch size, scaled: every
FLOP is per sample; C_t500's count is that of the one step counted, whose timesteps decide how
many rows get a prior), and model FLOPs utilisation against --peak-flops.
A numerical check compares C's shared-encoder and batched prior, output and gradients with the
full-pass reference on the GPU, in bf16.

--rounds R builds every variant at once and times R interleaved rounds of --steps steps each,
the order rotated per round, so that a slow drift of the GPU's clocks falls on every variant
alike; the JSON then also holds each round's median per variant and the per-round ratios
(``round_ratios``). --breakdown times alone the pieces LISA adds to a step (the prior's up path
on B, B/2 and B/4 rows, the decoder's forward and backward on as many rows, the shared
encoding for scale), in ``breakdown_ms``.

GPU run (estimated 3-5 minutes on one H100, most of it building and copying the models):

    python benchmarks/step_time.py --out benchmarks/results/step_time.json

--compile recompiles every block for each variant and batch size (minutes each); run it apart,
for example ``--compile --variants B C --batch-sizes 16``.

CPU smoke run of the same code at tiny size (seconds): ``--tiny --device cpu`` (on the CPU
both dtypes default to fp32: emulated half precision would take minutes).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import diffusers
import torch
import torch.nn.functional as F
from diffusers import ControlNetModel, DDPMScheduler, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from torch.utils.flop_counter import FlopCounterMode

from lisa_control import (
    Context,
    ControlTrainingStep,
    LikelihoodScoreAlignment,
    UNetControlNetBranch,
    make_objective,
)
from lisa_control.families import unet_split
from lisa_control.regularizers.decoders import ScoreDecoder
from lisa_control.training.compilation import compile_blocks
from lisa_control.zoo.unet import SD21_BASE_UNET, tiny_unet

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
LISA_LAYER_INDEX = 5  # down_5, the LISA authors' layer
LISA_WEIGHT = 0.2
LEARNING_RATE = 1e-5
MAX_GRAD_NORM = 1.0
VARIANTS = ("A", "B", "C", "C_fullprior", "C_batched", "C_f0.5", "C_f0.25", "C_t500")
# LikelihoodScoreAlignment arguments of the C variants that read part of the batch.
SUBSET_VARIANTS = {
    "C_f0.5": {"batch_fraction": 0.5},
    "C_f0.25": {"batch_fraction": 0.25},
    "C_t500": {"timestep_range": (500, 1000), "subset": "timestep"},
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default 8 16")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument(
        "--reference-dtype",
        choices=sorted(DTYPES),
        default="fp16",
        help="A's UNet weights and autocast dtype (diffusers' --mixed_precision)",
    )
    p.add_argument(
        "--library-dtype",
        choices=sorted(DTYPES),
        default="bf16",
        help="B/C: the UNet's weights and the autocast dtype",
    )
    p.add_argument("--channels-last", action="store_true", help="B/C: channels_last memory")
    p.add_argument("--compile", action="store_true", help="B/C: torch.compile every UNet block")
    p.add_argument("--gradient-checkpointing", action="store_true", help="B/C: on the ControlNet")
    p.add_argument(
        "--batched-prior",
        action="store_true",
        help="C and the subset variants (C_f0.5, C_f0.25, C_t500): batched_prior=True",
    )
    p.add_argument(
        "--peak-flops",
        type=float,
        default=989e12,
        help="dense bf16 peak FLOP/s for MFU (H100 SXM: 989e12)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="build every variant at once and time them in this many interleaved rounds of "
        "--steps steps each, the order rotated per round (1: one variant after another)",
    )
    p.add_argument(
        "--breakdown",
        action="store_true",
        help="also time alone the pieces LISA adds to a step: the prior's up path on B, B/2 "
        "and B/4 rows, the decoder's forward and backward, the shared encoding",
    )
    p.add_argument("--no-check", action="store_true", help="skip the numerical equality check")
    p.add_argument("--tiny", action="store_true", help="tiny UNet (smoke test)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/step_time.json")
    return p


# ----------------------------------------------------------------------------- setup


class Setup:
    """Shapes and the random master weights every variant copies."""

    def __init__(self, args):
        self.device = torch.device(args.device)
        if args.tiny:
            # The smallest UNet with SD's layout whose ControlNet still has down_5.
            self.unet_config = tiny_unet(
                sample_size=8,
                in_channels=4,
                block_out_channels=(16, 32, 32),
                cross_attention_dim=16,
                layers_per_block=1,
            )
        else:
            self.unet_config = dict(SD21_BASE_UNET)
        self.latent_size = self.unet_config["sample_size"]
        self.condition_size = 8 * self.latent_size  # the ControlNet's 8x condition encoder
        self.text_dim = self.unet_config["cross_attention_dim"]
        self.text_length = 8 if args.tiny else 77
        torch.manual_seed(args.seed)
        # Random init is fast on the GPU; the masters then wait on the CPU so that a variant's
        # peak memory counts only its own copies.
        with torch.device(self.device):
            unet = UNet2DConditionModel(**self.unet_config)
            controlnet = ControlNetModel.from_unet(unet)
        self.unet = unet.to("cpu").eval()
        self.controlnet = controlnet.to("cpu")

    def inputs(self, batch_size: int, dtype: torch.dtype, channels_last=False):
        """Latents, text context and condition as a trainer hands them over (weight dtype)."""
        g = torch.Generator(self.device).manual_seed(batch_size)
        latents = torch.randn(
            batch_size, 4, self.latent_size, self.latent_size, generator=g, device=self.device
        )
        text = torch.randn(
            batch_size, self.text_length, self.text_dim, generator=g, device=self.device
        )
        condition = torch.rand(
            batch_size, 3, self.condition_size, self.condition_size, generator=g, device=self.device
        )
        latents, text, condition = (t.to(dtype) for t in (latents, text, condition))
        if channels_last:
            latents = latents.contiguous(memory_format=torch.channels_last)
            condition = condition.contiguous(memory_format=torch.channels_last)
        return latents, text, condition


def autocast(device_type: str, dtype: torch.dtype):
    """Mixed-precision autocast; fp32 means none (the CPU smoke run)."""
    return torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32)


def _adamw_steps_taken(optimizer: torch.optim.Optimizer) -> int:
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state and "step" in state:
                return int(state["step"])
    return 0


# ----------------------------------------------------------------------------- variant A


class ReferenceStep:
    """diffusers' train_controlnet.py step plus the LISA authors' prior pass and decoder loss.

    Written out on purpose, without lisa_control's step: this is the loop users run today. Only
    the decoder module is lisa_control's ScoreDecoder, so A and C pay the same decoder FLOPs.
    """

    def __init__(self, setup: Setup, args):
        device = setup.device
        self.weight_dtype = DTYPES[args.reference_dtype]
        self.unet = copy.deepcopy(setup.unet).to(device, dtype=self.weight_dtype)
        self.unet.requires_grad_(False)
        self.controlnet = copy.deepcopy(setup.controlnet).to(device)
        self.controlnet.train()
        self.noise_scheduler = DDPMScheduler(num_train_timesteps=1000)

        # The LISA feature: the input of the 6th zero convolution, caught by a forward pre-hook.
        self._feature = None
        zero_conv = self.controlnet.controlnet_down_blocks[LISA_LAYER_INDEX]
        zero_conv.register_forward_pre_hook(self._keep_feature)
        channels = zero_conv.in_channels
        feature_size = self._probe_feature_size(setup)
        self.decoder = ScoreDecoder(
            channels, 4, round(math.log2(setup.latent_size // feature_size))
        ).to(device)

        self.params = [*self.controlnet.parameters(), *self.decoder.parameters()]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=LEARNING_RATE, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8
        )
        self.lr_scheduler = get_scheduler("constant", optimizer=self.optimizer)
        # accelerate uses a GradScaler for fp16 mixed precision, none for bf16.
        self.scaler = (
            torch.amp.GradScaler(device.type) if self.weight_dtype == torch.float16 else None
        )
        self.calls = 0

    def _keep_feature(self, module, args):
        self._feature = args[0]

    @torch.no_grad()
    def _probe_feature_size(self, setup: Setup) -> int:
        latents, text, condition = setup.inputs(1, torch.float32)
        self.controlnet(
            latents, torch.tensor([0], device=setup.device), text, condition, return_dict=False
        )
        size = self._feature.shape[-1]
        self._feature = None
        return size

    def _autocast(self):
        # What accelerator.prepare wraps around a trained model's forward.
        return autocast(self.unet.device.type, self.weight_dtype)

    def __call__(self, latents, text, condition) -> torch.Tensor:
        self.calls += 1
        noise = torch.randn_like(latents)
        bsz = latents.shape[0]
        timesteps = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (bsz,), device=latents.device
        ).long()
        noisy_latents = self.noise_scheduler.add_noise(latents, noise, timesteps)

        with self._autocast():
            down_block_res_samples, mid_block_res_sample = self.controlnet(
                noisy_latents,
                timesteps,
                encoder_hidden_states=text,
                controlnet_cond=condition,
                return_dict=False,
            )
        # accelerate's convert_outputs_to_fp32 on the prepared model's outputs.
        down_block_res_samples = [s.float() for s in down_block_res_samples]
        mid_block_res_sample = mid_block_res_sample.float()
        model_pred = self.unet(
            noisy_latents,
            timesteps,
            encoder_hidden_states=text,
            down_block_additional_residuals=[
                s.to(self.weight_dtype) for s in down_block_res_samples
            ],
            mid_block_additional_residual=mid_block_res_sample.to(self.weight_dtype),
            return_dict=False,
        )[0]
        target = noise  # epsilon prediction
        loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")

        # The LISA authors' additions: a second full UNet pass without residuals, and the decoder
        # regressing (target - prior) from the side network's feature.
        with torch.no_grad():
            prior = self.unet(
                noisy_latents, timesteps, encoder_hidden_states=text, return_dict=False
            )[0]
        with self._autocast():
            decoded = self.decoder(self._feature, timesteps)
        self._feature = None
        aux_loss = F.mse_loss(decoded.float(), (target.float() - prior.float()), reduction="mean")
        loss = loss + LISA_WEIGHT * aux_loss

        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)
            self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def skipped_steps(self) -> int:
        """Optimizer steps GradScaler skipped on inf/NaN gradients (they are cheaper)."""
        return self.calls - _adamw_steps_taken(self.optimizer)


# ----------------------------------------------------------------------------- variants B, C


class LibraryStep:
    """lisa_control's ControlTrainingStep with the speed options of this benchmark."""

    def __init__(
        self,
        setup: Setup,
        args,
        lisa: bool,
        shared_encoder_prior=True,
        batched=False,
        lisa_options: dict | None = None,
    ):
        device = setup.device
        self.weight_dtype = DTYPES[args.library_dtype]
        unet = copy.deepcopy(setup.unet).to(device, dtype=self.weight_dtype)
        controlnet = copy.deepcopy(setup.controlnet).to(device)
        if args.gradient_checkpointing:
            controlnet.enable_gradient_checkpointing()
        if args.channels_last:
            unet.to(memory_format=torch.channels_last)
            controlnet.to(memory_format=torch.channels_last)
        branch = UNetControlNetBranch(
            unet, controlnet, shared_encoder_prior=shared_encoder_prior, batched_prior=batched
        )
        regularizers = []
        if lisa:
            regularizers.append(
                LikelihoodScoreAlignment(
                    controlnet,
                    layer=f"down_{LISA_LAYER_INDEX}",
                    out_channels=4,
                    sample_size=setup.latent_size,
                    weight=LISA_WEIGHT,
                    **(lisa_options or {}),
                )
            )
        self.step = ControlTrainingStep(branch, make_objective("epsilon"), regularizers).to(device)
        self.step.train()
        if args.compile:
            compile_blocks(unet)
            compile_blocks(controlnet)
        self.params = self.step.trainable_parameters()
        self.optimizer = torch.optim.AdamW(
            self.params, lr=LEARNING_RATE, weight_decay=1e-2, fused=True
        )
        self.lr_scheduler = get_scheduler("constant", optimizer=self.optimizer)
        self.device_type = device.type

    def __call__(self, latents, text, condition) -> torch.Tensor:
        with autocast(self.device_type, self.weight_dtype):
            out = self.step(latents, Context(text), condition)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return out.loss.detach()


def build_variant(name: str, setup: Setup, args):
    if name == "A":
        return ReferenceStep(setup, args)
    if name == "B":
        return LibraryStep(setup, args, lisa=False)
    if name == "C":
        return LibraryStep(setup, args, lisa=True, batched=args.batched_prior)
    if name == "C_fullprior":
        return LibraryStep(setup, args, lisa=True, shared_encoder_prior=False)
    if name == "C_batched":
        return LibraryStep(setup, args, lisa=True, batched=True)
    if name in SUBSET_VARIANTS:
        return LibraryStep(
            setup, args, lisa=True, batched=args.batched_prior, lisa_options=SUBSET_VARIANTS[name]
        )
    raise ValueError(name)


# ----------------------------------------------------------------------------- measuring


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _gib(n_bytes: int) -> float:
    return n_bytes / 2**30


def time_steps(step: Callable, inputs, device, warmup: int, steps: int):
    losses = []
    for _ in range(warmup):
        losses.append(step(*inputs))
    times = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        losses.append(step(*inputs))
        _sync(device)
        times.append(time.perf_counter() - start)
    return times, losses


def count_flops(step: Callable, inputs) -> int:
    """FLOPs of one whole step (forward, backward; the optimizer's elementwise work is not
    counted), as executed: recomputation under checkpointing counts, skipped work does not."""
    counter = FlopCounterMode(display=False)
    with counter:
        step(*inputs)
    return counter.get_total_flops()


def run_record(name, variant, batch_size, times, losses, flops_at, inputs, args) -> dict:
    """One variant's timing record; FLOPs are counted on its first batch size only."""
    # Every FLOP of a UNet step (weight gradients included) is per sample, so one count per
    # variant scales exactly to other batch sizes; counting is slow (Python per op).
    if name not in flops_at:
        flops_at[name] = (count_flops(variant, inputs), batch_size)
    counted, counted_batch = flops_at[name]
    flops = counted * batch_size // counted_batch
    median = statistics.median(times)
    run = {
        "variant": name,
        "batch_size": batch_size,
        "median_s": median,
        "mean_s": statistics.fmean(times),
        "min_s": min(times),
        "max_s": max(times),
        "step_times_s": times,
        "flops_per_step": flops,  # executed FLOPs: recomputation under checkpointing counts
        "achieved_tflops": flops / median / 1e12,
        "mfu": flops / median / args.peak_flops,
        "last_loss": float(losses[-1]),
        "all_losses_finite": all(bool(torch.isfinite(loss)) for loss in losses),
    }
    if isinstance(variant, ReferenceStep):
        run["grad_scaler_skipped_steps"] = variant.skipped_steps()
    return run


def _release(args, device) -> None:
    if args.compile:
        torch._dynamo.reset()  # compiled code holds on to the variants' modules
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _wants_check(name: str, args, batch_size: int) -> bool:
    return name == "C" and not args.no_check and batch_size == min(args.batch_sizes)


def measure(
    name: str, setup: Setup, args, batch_size: int, warmup: int, steps: int, flops_at: dict
) -> dict:
    device = setup.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    build_start = time.perf_counter()
    variant = build_variant(name, setup, args)
    dtype = variant.weight_dtype
    inputs = setup.inputs(batch_size, dtype, channels_last=args.channels_last and name != "A")
    resident_bytes = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    steps_start = time.perf_counter()
    times, losses = time_steps(variant, inputs, device, warmup, steps)
    steps_wall = time.perf_counter() - steps_start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    run = run_record(name, variant, batch_size, times, losses, flops_at, inputs, args)
    run |= {
        "build_s": steps_start - build_start,
        "warmup_and_timed_wall_s": steps_wall,
        "peak_memory_gib": None if peak is None else _gib(peak),
        # Weights and inputs, before the first step allocates gradients and optimizer state.
        "resident_after_build_gib": None if resident_bytes is None else _gib(resident_bytes),
    }
    check = None
    if _wants_check(name, args, batch_size):
        check = equality_check(variant, setup, batch_size)
    del variant, inputs
    _release(args, device)
    return run, check


def measure_interleaved(
    names: list[str], setup: Setup, args, batch_size: int, warmup: int, steps: int, flops_at: dict
) -> tuple[list[dict], dict | None]:
    """Every variant built at once, warmed up, then ``args.rounds`` rounds of ``steps`` timed
    steps of each, the order rotated by one each round.

    Timing variants one after another lets a slow drift of the GPU's clocks (heat, power
    capping) fall on whichever runs last; interleaved rounds spread it over all of them, and
    the per-round medians show how large it is. A variant's peak memory is its own: the memory
    the variants built before it hold is taken off (``peak - allocated before its build``), and
    the setup's baseline put back, which is what the one-after-another mode measures.
    """
    device = setup.device
    cuda = device.type == "cuda"
    baseline = torch.cuda.memory_allocated(device) if cuda else 0
    built = {}
    for name in names:
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) if cuda else 0
        build_start = time.perf_counter()
        variant = build_variant(name, setup, args)
        channels_last = args.channels_last and name != "A"
        inputs = setup.inputs(batch_size, variant.weight_dtype, channels_last=channels_last)
        resident = torch.cuda.memory_allocated(device) - before + baseline if cuda else None
        _, losses = time_steps(variant, inputs, device, warmup, 0)
        peak = torch.cuda.max_memory_allocated(device) - before + baseline if cuda else None
        built[name] = {
            "variant": variant,
            "inputs": inputs,
            "losses": list(losses),
            "times": [],
            "round_medians_s": [],
            "build_and_warmup_s": time.perf_counter() - build_start,
            "peak": peak,
            "resident": resident,
        }
    for r in range(args.rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            entry = built[name]
            times, losses = time_steps(entry["variant"], entry["inputs"], device, 0, steps)
            entry["times"] += times
            entry["losses"] += losses
            entry["round_medians_s"].append(statistics.median(times))
    runs, check = [], None
    for name in names:
        entry = built.pop(name)
        variant, inputs = entry["variant"], entry["inputs"]
        run = run_record(
            name, variant, batch_size, entry["times"], entry["losses"], flops_at, inputs, args
        )
        run |= {
            "round_medians_s": entry["round_medians_s"],
            "build_and_warmup_s": entry["build_and_warmup_s"],
            "peak_memory_gib": None if entry["peak"] is None else _gib(entry["peak"]),
            "resident_after_build_gib": (
                None if entry["resident"] is None else _gib(entry["resident"])
            ),
        }
        runs.append(run)
        if _wants_check(name, args, batch_size):
            check = equality_check(variant, setup, batch_size)
        del variant, inputs, entry
        _release(args, device)
    return runs, check


def _median_ms(fn: Callable, device, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def breakdown(setup: Setup, args, batch_size: int, repeats: int = 10) -> dict:
    """Milliseconds of each piece LISA adds to a plain step, timed alone on a C variant
    (median of ``repeats`` calls, the step's autocast):

    * ``encode``: the main network's down path, which B and C share (for scale);
    * ``prior_rows_k``: the prior, the main network's mid and up path without residuals under
      no_grad, on k = B, ceil(B/2), ceil(B/4) rows of one encoding;
    * ``decoder_rows_k``: the LISA decoder's forward and backward on the hooked feature of k
      rows (a feature that requires grad, as the side network's does).
    """
    device = setup.device
    variant = build_variant("C", setup, args)
    latents, text, condition = setup.inputs(batch_size, variant.weight_dtype)
    lisa = variant.step.regularizers[0]
    unet = variant.step.branch.main_network
    shapes = []
    handle = lisa._hook.ref.module.register_forward_pre_hook(
        lambda module, inputs: shapes.append(tuple(inputs[0].shape))
    )
    variant(latents, text, condition)
    handle.remove()
    g = torch.Generator(device).manual_seed(0)
    timesteps = torch.randint(0, 1000, (batch_size,), generator=g, device=device)
    noised = latents.to(unet.dtype)
    result = {"feature_shape": list(shapes[-1])}
    with autocast(device.type, variant.weight_dtype):
        with torch.no_grad():
            encoding = unet_split.encode(unet, noised, timesteps, encoder_hidden_states=text)
        result["encode"] = _median_ms(
            lambda: unet_split.encode(unet, noised, timesteps, encoder_hidden_states=text),
            device,
            repeats,
        )
        for k in sorted({batch_size, math.ceil(batch_size / 2), math.ceil(batch_size / 4)}):
            rows = torch.arange(k, device=device)
            part = encoding.select(rows)

            @torch.no_grad()
            def prior(part=part):
                return unet_split.decode(unet, part)

            result[f"prior_rows_{k}"] = _median_ms(prior, device, repeats)
            feature = torch.randn(k, *shapes[-1][1:], device=device, requires_grad=True)

            def decoder_step(feature=feature, t=timesteps[:k]):
                lisa.decoder(feature, t).float().pow(2).mean().backward()

            result[f"decoder_rows_{k}"] = _median_ms(decoder_step, device, repeats)
    result["decoder_parameters"] = sum(p.numel() for p in lisa.decoder.parameters())
    del variant, encoding
    _release(args, device)
    return result


def equality_check(variant: LibraryStep, setup: Setup, batch_size: int) -> dict:
    """C's shared-encoder and batched paths against the full-pass reference: same inputs, noise
    and timesteps, the benchmark's precision; max |difference| of prior, output, loss and
    gradients. ``full_repeat`` (the reference run again) is the run-to-run floor: GPU kernels
    such as cuDNN's weight gradients are not bitwise deterministic."""
    step, branch = variant.step, variant.step.branch
    latents, text, condition = setup.inputs(batch_size, variant.weight_dtype)
    generator = torch.Generator(setup.device).manual_seed(1)
    noise = torch.randn(latents.shape, generator=generator, device=setup.device)
    timesteps = torch.randint(0, 1000, (batch_size,), generator=generator, device=setup.device)
    predictions = {}

    def keep_prediction(module, args, output):
        predictions["last"] = output

    handle = branch.register_forward_hook(keep_prediction)
    saved_flags = branch.shared_encoder_prior, branch.batched_prior
    modes = {
        "full": (False, False),
        "full_repeat": (False, False),
        "shared": (True, False),
        "batched": (True, True),
    }
    results = {}
    for mode, flags in modes.items():
        branch.shared_encoder_prior, branch.batched_prior = flags
        step.zero_grad(set_to_none=True)
        with autocast(setup.device.type, variant.weight_dtype):
            out = step(
                latents,
                Context(text),
                condition,
                noise=noise.to(latents.dtype),
                timesteps=timesteps,
            )
        out.loss.backward()
        grads = {n: p.grad.float() for n, p in step.named_parameters() if p.grad is not None}
        results[mode] = (out.loss.detach().float(), predictions.pop("last"), grads)
    handle.remove()
    branch.shared_encoder_prior, branch.batched_prior = saved_flags
    step.zero_grad(set_to_none=True)

    def max_abs_diff(a, b) -> float:
        return (a.float() - b.float()).abs().max().item()

    ref_loss, ref_pred, ref_grads = results["full"]
    report = {
        "precision": str(variant.weight_dtype),
        "batch_size": batch_size,
        "prior_max_abs_reference": ref_pred.prior.float().abs().max().item(),
        "grad_max_abs_reference": max(g.abs().max().item() for g in ref_grads.values()),
    }
    for mode in ("full_repeat", "shared", "batched"):
        loss, pred, grads = results[mode]
        diffs = {
            "prior_max_abs_diff": max_abs_diff(pred.prior, ref_pred.prior),
            "output_max_abs_diff": max_abs_diff(pred.output, ref_pred.output),
            "loss_abs_diff": max_abs_diff(loss, ref_loss),
            "grad_max_abs_diff": max(max_abs_diff(grads[n], ref_grads[n]) for n in ref_grads),
        }
        diffs["exactly_equal"] = all(v == 0 for v in diffs.values())
        report[mode] = diffs
    return report


# ----------------------------------------------------------------------------- main


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def print_table(result: dict) -> None:
    print(f"\n{result['device_name']}  torch {result['versions']['torch']}")
    print(
        f"{'variant':<12} {'batch':>5} {'median ms':>10} {'peak GiB':>9} {'TFLOP/s':>8} {'MFU':>6}"
    )
    for run in result["runs"]:
        peak = "-" if run["peak_memory_gib"] is None else f"{run['peak_memory_gib']:.2f}"
        print(
            f"{run['variant']:<12} {run['batch_size']:>5} {1e3 * run['median_s']:>10.1f} "
            f"{peak:>9} {run['achieved_tflops']:>8.1f} {100 * run['mfu']:>5.1f}%"
        )
    for batch, ratios in result["ratios"].items():
        print(f"batch {batch}: " + "  ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    for batch, ratios in result["round_ratios"].items():
        cells = [f"{k} {statistics.median(v):.3f}" for k, v in ratios.items()]
        print(f"batch {batch}, median of the rounds' ratios: " + "  ".join(cells))


def main(argv=None) -> dict:
    # diffusers warns on every .to(dtype) of a UNet built in code; nothing here has fp32-only
    # parts. Restored afterwards: the smoke test calls main() inside a pytest session.
    verbosity = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()
    try:
        return run_benchmark(sys.argv[1:] if argv is None else list(argv))
    finally:
        diffusers.utils.logging.set_verbosity(verbosity)


def run_benchmark(argv: list[str]) -> dict:
    args = build_parser().parse_args(argv)
    if args.device == "cpu":
        # CPUs without bf16/fp16 units emulate them at a crawl; the CPU run checks the code.
        for name in ("reference_dtype", "library_dtype"):
            if f"--{name.replace('_', '-')}" not in argv:
                setattr(args, name, "fp32")
    if args.batch_sizes is None:
        args.batch_sizes = [2] if args.tiny else [8, 16]
    steps = args.steps if args.steps is not None else (2 if args.tiny else 20)
    warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 5)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device; pass --device cpu (with --tiny for a smoke run)")

    started = time.perf_counter()
    setup = Setup(args)
    runs, check, flops_at = [], None, {}
    pieces = {}
    for batch_size in args.batch_sizes:
        if args.rounds > 1:
            measured, run_check = measure_interleaved(
                list(args.variants), setup, args, batch_size, warmup, steps, flops_at
            )
            check = check or run_check
        else:
            measured = []
            for name in args.variants:
                run, run_check = measure(name, setup, args, batch_size, warmup, steps, flops_at)
                measured.append(run)
                check = check or run_check
        for run in measured:
            runs.append(run)
            print(
                f"{run['variant']:<12} batch {batch_size:>3}: {1e3 * run['median_s']:8.1f} ms/step",
                flush=True,
            )
        if args.breakdown:
            pieces[str(batch_size)] = breakdown(setup, args, batch_size)
            print(f"breakdown batch {batch_size}: {pieces[str(batch_size)]}", flush=True)

    median = {(r["variant"], r["batch_size"]): r["median_s"] for r in runs}
    ratios, round_ratios = {}, {}
    for batch_size in args.batch_sizes:
        pairs = [("C/B", "C", "B"), ("A/B", "A", "B"), ("A/C", "A", "C")]
        pairs += [("C_fullprior/B", "C_fullprior", "B"), ("C_batched/C", "C_batched", "C")]
        pairs += [(f"{name}/B", name, "B") for name in SUBSET_VARIANTS]
        ratios[str(batch_size)] = {
            label: median[(num, batch_size)] / median[(den, batch_size)]
            for label, num, den in pairs
            if (num, batch_size) in median and (den, batch_size) in median
        }
        if args.rounds > 1:
            # The ratio within each round, where both variants ran minutes apart at most.
            per_round = {(r["variant"], batch_size): r["round_medians_s"] for r in runs
                         if r["batch_size"] == batch_size}  # fmt: skip
            round_ratios[str(batch_size)] = {
                label: [
                    a / b
                    for a, b in zip(per_round[(num, batch_size)], per_round[(den, batch_size)])
                ]  # fmt: skip
                for label, num, den in pairs
                if (num, batch_size) in per_round and (den, batch_size) in per_round
            }

    result = {
        "argv": [sys.argv[0], *argv],
        "python_executable": sys.executable,
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "python": platform.python_version(),
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        },
        "backends": {
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "sdpa_flash": torch.backends.cuda.flash_sdp_enabled(),
        },
        "device_name": device_name(setup.device),
        "config": {
            "model": "tiny_unet" if args.tiny else "SD21_BASE_UNET",
            "unet_config": {
                k: list(v) if isinstance(v, tuple) else v for k, v in setup.unet_config.items()
            },
            "latent_size": setup.latent_size,
            "condition_size": setup.condition_size,
            "text_context": [setup.text_length, setup.text_dim],
            "batch_sizes": args.batch_sizes,
            "timed_steps": steps,
            "rounds": args.rounds,
            "warmup_steps": warmup,
            "reference_dtype": args.reference_dtype,
            "library_dtype": args.library_dtype,
            "channels_last": args.channels_last,
            "compile": args.compile,
            "gradient_checkpointing": args.gradient_checkpointing,
            "batched_prior": args.batched_prior,
            "peak_flops": args.peak_flops,
            "unet_parameters": sum(p.numel() for p in setup.unet.parameters()),
            "controlnet_parameters": sum(p.numel() for p in setup.controlnet.parameters()),
        },
        "runs": runs,
        "ratios": ratios,
        "round_ratios": round_ratios,
        "breakdown_ms": pieces,
        "equality_check": check,
        "total_wall_s": time.perf_counter() - started,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    print_table(result)
    return result


if __name__ == "__main__":
    main()

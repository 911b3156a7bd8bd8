"""The frozen encoders around the main network: images to the space the main network denoises
(VAE latents, or pixels for pixel-space models) and captions to its text context."""

from __future__ import annotations

import torch

from ..core.branch import Context
from .base import MainModel


class FrozenEncoders:
    """Encodes a batch the way diffusers' ControlNet script does, optionally caching results.

    With ``cache=True`` each dataset index's image is encoded once (the VAE latent is the one
    sampled on first use) and each distinct caption text once. Image caching is exact only for
    image transforms fixed per index (center crop, or ``ControlDataset``'s per-index random crop);
    captions are keyed by their text, so caption choices that change between visits (empty
    prompts, one of several captions) are always encoded as drawn.
    """

    def __init__(self, model: MainModel, device, dtype=torch.float32, cache: bool = False):
        self.model = model
        self.device = device
        self.dtype = dtype
        self.cache = cache
        self._latents: dict[int, torch.Tensor] = {}
        self._contexts: dict[str, torch.Tensor | tuple[torch.Tensor, torch.Tensor]] = {}
        self._shared_extra: dict = {}
        prompt_modules = model.prompt_encoder.modules() if model.prompt_encoder else []
        for module in (model.vae, model.text_encoder, *prompt_modules):
            if module is not None:
                module.requires_grad_(False).eval().to(device)
                if dtype != torch.float32:
                    module.to(dtype=dtype)

    @torch.no_grad()
    def _images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pixel_values = pixel_values.to(self.device, self.dtype)
        if self.model.vae is None:
            return pixel_values
        latents = self.model.family.encode_images(self.model.vae, pixel_values)
        return self.model.family.normalize_latents(self.model.vae, latents)

    @torch.no_grad()
    def _prompts(self, captions: list[str]) -> torch.Tensor:
        """Hidden states of the model's single CLIP text encoder (SD 1.x/2.x)."""
        tok = self.model.tokenizer
        ids = tok(
            captions,
            max_length=tok.model_max_length,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        return self.model.text_encoder(ids, return_dict=False)[0].to(self.dtype)

    def null_context(self, batch: int) -> Context:
        """The constant context of a model trained without text: one zero token (and, for SD3-
        style and Flux transformers, a zero pooled vector)."""
        return self.model.null_context(batch, self.device, self.dtype)

    def prompt_context(self, captions: list[str]) -> Context:
        """The context of ``captions``; the null context for models trained without text."""
        if self.model.prompt_encoder is not None:
            return self.model.prompt_encoder(captions, self.device).to(dtype=self.dtype)
        if self.model.text_encoder is None:
            return self.null_context(len(captions))
        return Context(encoder_hidden_states=self._prompts(captions))

    @torch.no_grad()
    def encode_condition(self, condition: torch.Tensor) -> torch.Tensor:
        """The condition as the side network takes it: for ``condition_in_latent_space`` models
        the family's encoding of the control image in [0, 1] (``Family.encode_condition``: VAE
        latents for SD3 and Flux, VACE control latents for Wan), else the image itself. Several
        conditions (a mapping name -> image, or a list) are encoded each."""
        if isinstance(condition, dict):
            return {name: self.encode_condition(c) for name, c in condition.items()}
        if isinstance(condition, (list, tuple)):
            return [self.encode_condition(c) for c in condition]
        condition = condition.to(self.device)
        if not self.model.condition_in_latent_space:
            return condition
        return self.model.family.encode_condition(self.model.vae, condition.to(self.dtype))

    def _cached(self, store, keys, compute) -> list:
        """The stored entries of ``keys`` (dataset indices or caption texts), computing the
        missing ones together: ``compute(rows)`` gets their positions in the batch and returns
        one entry per row."""
        missing = [i for i, key in enumerate(keys) if key not in store]
        if missing:
            fresh = compute(missing)
            for row, i in enumerate(missing):
                store[keys[i]] = fresh[row]
        return [store[key] for key in keys]

    def encode(self, batch: dict) -> tuple[torch.Tensor, Context, torch.Tensor]:
        """(x0, context, condition) for one collated batch."""
        captions = list(batch["caption"])
        cached = self.cache and "index" in batch
        indices = [int(i) for i in batch["index"]] if cached else []
        if cached:
            x0 = torch.stack(
                self._cached(
                    self._latents, indices, lambda rows: self._images(batch["pixel_values"][rows])
                )
            )
        else:
            x0 = self._images(batch["pixel_values"])
        condition = self.encode_condition(batch["conditioning_pixel_values"])
        if cached and self.model.prompt_encoder is not None:
            return x0, self._cached_pipeline_context(captions), condition
        if cached and self.model.text_encoder is not None:
            text = self._cached(
                self._contexts, captions, lambda rows: self._prompts([captions[r] for r in rows])
            )
            return x0, Context(encoder_hidden_states=torch.stack(text)), condition
        return x0, self.prompt_context(captions), condition

    def _cached_pipeline_context(self, captions: list[str]) -> Context:
        """SD3 / Flux prompt contexts, encoded once per caption text. Token states and the pooled
        vector belong to each sample; the rest of ``extra`` (Flux's text position ids) is the
        same for every caption and kept from the last encoding."""

        def encode(rows):
            fresh = self.prompt_context([captions[r] for r in rows])
            self._shared_extra = {k: v for k, v in fresh.extra.items() if k != "pooled_projections"}
            return list(zip(fresh.encoder_hidden_states, fresh.extra["pooled_projections"]))

        tokens, pooled = zip(*self._cached(self._contexts, captions, encode))
        extra = {**self._shared_extra, "pooled_projections": torch.stack(pooled)}
        return Context(encoder_hidden_states=torch.stack(tokens), extra=extra)


class PipelinePrompts:
    """Text conditioning through a diffusers pipeline's own ``encode_prompt``, combined as the
    family's ``encode_prompts`` says (SD3: two CLIPs and T5; Flux: CLIP pooled, T5 tokens)."""

    def __init__(self, pipe, encode):
        self.pipe = pipe
        self.encode = encode

    def modules(self) -> list[torch.nn.Module]:
        names = ("text_encoder", "text_encoder_2", "text_encoder_3")
        return [m for m in (getattr(self.pipe, n, None) for n in names) if m is not None]

    @torch.no_grad()
    def __call__(self, captions: list[str], device) -> Context:
        return self.encode(self.pipe, list(captions), device)

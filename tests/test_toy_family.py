"""A model family defined entirely in this file trains, resumes bit-exactly and samples through
the library's own loading, builders, loop and sampler, with no library file edited: the test of
the ``Family`` interface.

The toy main network denoises pixels with two convolutions; its side network encodes the
condition, and one zero-initialised 1x1 projection adds a residual to the main network's hidden
features. LISA reads the projection's input.
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from factories import make_image_folder
from torch import nn

from lisa_control.core.branch import Context, DualBranch, Prediction
from lisa_control.core.hooks import NetworkLayout, register_layout, resolve_layer
from lisa_control.families import FAMILIES, Family, register_family
from lisa_control.families.loading import load_main_model, save_pixel_model
from lisa_control.regularizers.decoders import ScoreDecoder


class ToyDenoiser(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, in_channels: int = 3, width: int = 16, sample_size: int = 16):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels + 1, width, 3, padding=1)
        self.conv_out = nn.Conv2d(width, in_channels, 3, padding=1)

    def forward(self, x, timesteps, residual=None):
        t = (timesteps.float() / 1000).reshape(-1, 1, 1, 1).expand(x.shape[0], 1, *x.shape[2:])
        h = torch.nn.functional.silu(self.conv_in(torch.cat([x, t.to(x.dtype)], 1)))
        return self.conv_out(h if residual is None else h + residual)


class ToySideNetwork(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, conditioning_channels: int = 3, width: int = 16):
        super().__init__()
        self.encoder = nn.Conv2d(conditioning_channels, width, 3, padding=1)
        self.projections = nn.ModuleList([nn.Conv2d(width, width, 1)])
        nn.init.zeros_(self.projections[0].weight)
        nn.init.zeros_(self.projections[0].bias)

    def forward(self, condition):
        return self.projections[0](torch.nn.functional.silu(self.encoder(condition)))


class ToyBranch(DualBranch):
    side_network_class = ToySideNetwork
    condition_at_pixel_level = True

    @classmethod
    def from_main(cls, main, side=None, conditioning_channels=3, condition_downscale=1):
        side = side or ToySideNetwork(conditioning_channels, main.config.width)
        return cls(main, side)

    @property
    def condition_channels(self) -> int:
        return self.side_network.config.conditioning_channels

    def forward(self, x_t, timesteps, context: Context, condition, with_prior=False):
        residual = self.side_network(condition.to(x_t.dtype))
        output = self.main_network(x_t, timesteps, residual)
        return Prediction(output, self.prior(x_t, timesteps, context) if with_prior else None)

    @torch.no_grad()
    def prior(self, x_t, timesteps, context):
        return self.main_network(x_t, timesteps)

    def lisa_decoder(self, layer, sample_size=None, **shape):
        side = self.side_network
        return ScoreDecoder.for_layer(
            side, resolve_layer(side, layer), self.main_network.config.in_channels,
            sample_size or self.main_network.config.sample_size, **shape,
        )


class ToyFamily(Family):
    name = "toy"
    network_class = ToyDenoiser
    network_folder = "denoiser"
    scheduler_class = DDPMScheduler
    side_networks = {"controlnet": ToyBranch}

    def null_context(self, network, batch, device=None, dtype=torch.float32):
        return Context(encoder_hidden_states=torch.zeros(batch, 1, 1, device=device, dtype=dtype))

    def predict(self, network, x_t, timesteps, context):
        return network(x_t, timesteps)


register_layout(
    ToySideNetwork,
    NetworkLayout(
        projection_lists={"proj": "projections"},
        feature_shape=lambda net, ref, size: (net.config.width, size),
        heavy_blocks=("encoder",),
    ),
)


@pytest.fixture(scope="module")
def toy_model(tmp_path_factory):
    register_family(ToyFamily())
    root = tmp_path_factory.mktemp("toy")
    torch.manual_seed(0)
    save_pixel_model(root / "model", ToyDenoiser(), DDPMScheduler(), resolution=16, task=None)
    yield root / "model", make_image_folder(root / "data", n=8)
    FAMILIES.pop("toy")


def _train_argv(model, data, out, steps, *extra):
    flags = dict(
        pretrained_model_name_or_path=model, train_data_dir=data, resolution=16,
        train_batch_size=2, max_train_steps=steps, checkpointing_steps=2, validation_steps=0,
        learning_rate=1e-3, seed=0, output_dir=out, report_to="none",
    )
    argv = ["train"]
    for key, value in flags.items():
        argv += [f"--{key}", str(value)]
    return argv + ["--no-progress", *extra]


def _losses(out):
    lines = (out / "loss_log.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_a_family_defined_in_a_test_loads_trains_resumes_and_samples(toy_model, tmp_path):
    from lisa_control.cli import main

    model_dir, data = toy_model
    assert json.loads((model_dir / "lisa_model.json").read_text())["family"] == "toy"
    assert (model_dir / "denoiser" / "config.json").is_file()
    model = load_main_model(str(model_dir))
    assert isinstance(model.family, ToyFamily) and isinstance(model.main_network, ToyDenoiser)

    full, broken = tmp_path / "full", tmp_path / "broken"
    assert main(_train_argv(model_dir, data, full, 4)) == 0
    assert main(_train_argv(model_dir, data, broken, 2)) == 0
    assert main(_train_argv(model_dir, data, broken, 4, "--resume_from_checkpoint", "latest")) == 0
    reference, resumed = _losses(full), _losses(broken)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    # Bit-exact: the same floats, not merely close ones.
    assert [r["loss"] for r in resumed] == [r["loss"] for r in reference]
    assert all(r["aux_loss"] > 0 for r in reference), "LISA ran on the toy side network"

    side = ToySideNetwork.from_pretrained(full / "controlnet")
    assert side.projections[0].weight.abs().sum() > 0, "the zero projection was trained"

    grid = tmp_path / "samples.png"
    argv = ["sample", "--controlnet", str(full / "controlnet"), "--pretrained_model_name_or_path",
            str(model_dir), "--image", str(data / "cond0.png"), "--num_inference_steps", "3",
            "--output", str(grid)]
    assert main(argv) == 0
    import numpy as np
    from PIL import Image

    with Image.open(grid) as image:
        pixels = np.asarray(image.convert("L"), dtype=np.float32)
    assert pixels.shape[1] >= 2 * 16 and pixels.std() > 0


def test_an_unknown_family_in_a_model_folder_is_refused_in_one_line(tmp_path):
    from lisa_control.core.errors import ModelError

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "lisa_model.json").write_text(json.dumps({"family": "nope", "resolution": 16}))
    with pytest.raises(ModelError, match="unknown model family 'nope'"):
        load_main_model(str(folder))

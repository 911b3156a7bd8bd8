"""LayerSync against the formula written out in the test, what its gradient may and may not
reach, the errors a user can cause, and LayerSync next to LISA in one training step.

    reg = mean over batch and tokens of -(normalize(h_shallow) . normalize(h_deep).detach())
    L   = sum over pairs of w * reg

Everything is built from small networks in code; CPU only.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import SD3Transformer2DModel, UNet2DConditionModel
from torch import nn

from lisa_control import (
    ConfigError,
    Context,
    ControlTrainingStep,
    LikelihoodScoreAlignment,
    UNetControlNetBranch,
    make_objective,
)
from lisa_control.zoo.unet import tiny_unet
from lisa_control.regularizers.layersync import LayerSync, default_pairs, parse_pairs

SAMPLE_SIZE = 16
TEXT_DIM = 32  # tiny_unet's cross_attention_dim


# ----------------------------------------------------------------------------- builders


class ResidualMLP(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)

    def forward(self, tokens):
        return tokens + self.down(F.gelu(self.up(tokens)))


class TokenStack(nn.Module):
    """A tiny transformer-shaped network: embed, a stack of equal-width blocks, head."""

    def __init__(self, width: int = 8, depth: int = 6):
        super().__init__()
        self.embed = nn.Linear(3, width)
        self.blocks = nn.ModuleList(ResidualMLP(width) for _ in range(depth))
        self.head = nn.Linear(width, 3)

    def block_outputs(self, x):
        outputs, h = [], self.embed(x)
        for block in self.blocks:
            h = block(h)
            outputs.append(h)
        return outputs

    def forward(self, x):
        return self.head(self.block_outputs(x)[-1])


class ConvStack(nn.Module):
    """Feature maps that shrink: stem (full size) -> strided conv (half size), equal widths."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.down = nn.Conv2d(width, width, 3, stride=2, padding=1)

    def forward(self, x):
        return self.down(F.silu(self.stem(x)))


def reference_layersync(pairs_of_features, weights):
    """The paper's formula, written out: per pair the negative mean token cosine, deep detached."""
    total = 0.0
    for (shallow, deep), weight in zip(pairs_of_features, weights):
        z_shallow = F.normalize(shallow, dim=-1)
        z_deep = F.normalize(deep, dim=-1).detach()
        total = total + weight * -(z_shallow * z_deep).sum(-1).mean()
    return total


def as_tokens(feature_map):
    b, c, h, w = feature_map.shape
    return feature_map.reshape(b, c, h * w).permute(0, 2, 1)


def capture_outputs(network, paths):
    """Plain forward hooks of the test's own, keeping each module's output (element 0 of a
    tuple), to compare LayerSync's hooked features with."""
    captured, handles = {}, []
    for path in paths:

        def keep(module, args, output, path=path):
            captured[path] = output[0] if isinstance(output, tuple) else output

        handles.append(network.get_submodule(path).register_forward_hook(keep))
    return captured, handles


def tiny_unet_model(**overrides):
    return UNet2DConditionModel(**tiny_unet(sample_size=SAMPLE_SIZE, **overrides))


def run_unet(unet, batch=2):
    x = torch.randn(batch, 3, SAMPLE_SIZE, SAMPLE_SIZE)
    return unet(x, torch.tensor([10, 700])[:batch], torch.randn(batch, 1, TEXT_DIM)).sample


def grad_norm(module):
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return sum(g.abs().sum().item() for g in grads)


# ----------------------------------------------------------------------------- the formula


def test_loss_is_the_weighted_sum_over_pairs_of_the_negative_token_cosine():
    net = TokenStack()
    layersync = LayerSync(net, pairs="blocks.1->blocks.3, blocks.2->blocks.5", weight=[0.2, 0.5])
    x = torch.randn(4, 10, 3)
    net(x)
    out = layersync.loss()

    h = net.block_outputs(x)
    expected = reference_layersync([(h[1], h[3]), (h[2], h[5])], [0.2, 0.5])
    torch.testing.assert_close(out.loss, expected)
    for label, (a, b) in {"blocks.1->blocks.3": (1, 3), "blocks.2->blocks.5": (2, 5)}.items():
        cosine = F.cosine_similarity(h[a], h[b], dim=-1).mean()
        torch.testing.assert_close(out.logs[f"layersync_cos/{label}"], cosine)
        assert not out.logs[f"layersync_cos/{label}"].requires_grad


def test_feature_maps_are_tokens_and_a_larger_deep_map_is_average_pooled():
    """Tiny UNet: down_blocks.1 (64 ch, 4x4 after its downsampler) vs up_blocks.1 (64 ch,
    16x16): the deep map is area-averaged to 4x4, then both are read as 16 tokens."""
    unet = tiny_unet_model()
    paths = ["down_blocks.1", "up_blocks.1"]
    layersync = LayerSync(unet, pairs="->".join(paths), weight=0.2)
    captured, handles = capture_outputs(unet, paths)
    run_unet(unet)
    out = layersync.loss()

    shallow, deep = captured["down_blocks.1"], captured["up_blocks.1"]
    assert shallow.shape[-2:] == (4, 4) and deep.shape[-2:] == (16, 16)
    pooled = F.adaptive_avg_pool2d(deep, (4, 4))
    expected = reference_layersync([(as_tokens(shallow), as_tokens(pooled))], [0.2])
    torch.testing.assert_close(out.loss, expected)
    for h in handles:
        h.remove()


def test_a_smaller_deep_map_is_interpolated_bilinearly():
    net = ConvStack()
    layersync = LayerSync(net, pairs=[("stem", "down")], weight=1.0)
    captured, handles = capture_outputs(net, ["stem", "down"])
    net(torch.randn(2, 3, 8, 8))
    out = layersync.loss()

    upsampled = F.interpolate(captured["down"], size=(8, 8), mode="bilinear", align_corners=False)
    expected = reference_layersync([(as_tokens(captured["stem"]), as_tokens(upsampled))], [1.0])
    torch.testing.assert_close(out.loss, expected)
    for h in handles:
        h.remove()


# ----------------------------------------------------------------------------- gradients


def test_gradient_reaches_only_what_is_upstream_of_the_shallow_layer():
    net = TokenStack()
    layersync = LayerSync(net, pairs="blocks.1->blocks.4")
    x = torch.randn(4, 10, 3)
    net(x)
    layersync.loss().loss.backward()

    for upstream in (net.embed, net.blocks[0], net.blocks[1]):
        assert grad_norm(upstream) > 0
    # Blocks 2-4 influence only the (detached) deep feature; the head influences neither.
    for downstream in (*net.blocks[2:], net.head):
        assert all(p.grad is None for p in downstream.parameters())

    # The gradient itself is the formula's.
    shallow_params = [*net.embed.parameters(), *net.blocks[:2].parameters()]
    h = net.block_outputs(x)
    expected = torch.autograd.grad(reference_layersync([(h[1], h[4])], [0.2]), shallow_params)
    for param, grad in zip(shallow_params, expected):
        torch.testing.assert_close(param.grad, grad)


def test_unet_blocks_between_the_two_layers_get_no_gradient():
    unet = tiny_unet_model()
    layersync = LayerSync(unet, pairs="down_blocks.1->up_blocks.1")
    run_unet(unet)
    layersync.loss().loss.backward()

    for upstream in ("conv_in", "time_embedding", "down_blocks.0", "down_blocks.1"):
        assert grad_norm(unet.get_submodule(upstream)) > 0, upstream
    for deep_only in ("down_blocks.2", "mid_block", "up_blocks.0", "up_blocks.1"):
        assert grad_norm(unet.get_submodule(deep_only)) == 0, deep_only


# ----------------------------------------------------------------------------- API


def test_no_parameters_no_prior_and_usable_without_a_step_state():
    net = TokenStack()
    layersync = LayerSync(net, pairs="blocks.1->blocks.3")
    assert layersync.name == "layersync" and layersync.needs_prior is False
    assert list(layersync.parameters()) == []
    layersync.check_optimizer(torch.optim.SGD(net.parameters(), lr=0.1))
    net(torch.randn(2, 5, 3))
    assert layersync().loss.shape == ()  # forward() with no state, like loss()


def test_a_feature_is_used_once_and_remove_hooks_detaches():
    net = TokenStack()
    layersync = LayerSync(net, pairs="blocks.1->blocks.3")
    net(torch.randn(2, 5, 3))
    layersync.loss()
    with pytest.raises(RuntimeError, match="no feature was captured"):
        layersync.loss()  # no forward since: never a stale feature
    layersync.remove_hooks()
    net(torch.randn(2, 5, 3))
    with pytest.raises(RuntimeError, match="no feature was captured"):
        layersync.loss()


def test_pairs_parse_from_strings_and_tuples():
    assert parse_pairs(" a -> b ,c->d") == [("a", "b"), ("c", "d")]
    assert parse_pairs([("a", "b"), "c->d"]) == [("a", "b"), ("c", "d")]
    for bad in ("a", "a->b->c", "a->", "", "a->a", [("a",)], [3]):
        with pytest.raises(ConfigError):
            parse_pairs(bad)


def test_default_pairs():
    unet = tiny_unet_model()
    assert default_pairs(unet) == "down_blocks.1->mid_block"
    side = UNetControlNetBranch.from_main(unet, condition_downscale=1).side_network
    assert default_pairs(side) == "down_blocks.1->down_blocks.2"  # a ControlNet has no up blocks
    # SiT-XL/2's 28 blocks: after block 8 and after block 16 (1-based), as in the paper.
    assert default_pairs(TokenStack(depth=28)) == "blocks.7->blocks.15"
    with pytest.raises(ConfigError, match="cannot choose default"):
        default_pairs(ConvStack())
    # The defaults run: shapes agree.
    for network, run in ((unet, run_unet), (TokenStack(), lambda n: n(torch.randn(2, 4, 3)))):
        layersync = LayerSync(network)
        run(network)
        assert torch.isfinite(layersync.loss().loss)


def test_dual_stream_transformer_blocks_align_image_tokens_not_text():
    """SD3's JointTransformerBlock returns (text, image); the image stream is aligned."""
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=3,
        out_channels=3,
        num_layers=3,
        num_attention_heads=2,
        attention_head_dim=8,
        joint_attention_dim=8,
        caption_projection_dim=16,
        pooled_projection_dim=8,
        pos_embed_max_size=4,
    )
    pairs = default_pairs(transformer)
    assert pairs == "transformer_blocks.0->transformer_blocks.1"
    by_default = LayerSync(transformer, pairs)
    explicit = LayerSync(transformer, "transformer_blocks.0[1]->transformer_blocks.1[1]")
    images = []
    handle = transformer.transformer_blocks[0].register_forward_hook(
        lambda module, args, output: images.append(output[1])
    )
    text_tokens = 5
    transformer(
        torch.randn(2, 3, 8, 8),
        torch.randn(2, text_tokens, 8),
        torch.randn(2, 8),
        torch.tensor([100, 900]),
    )
    handle.remove()
    assert images[0].shape[1] == (8 // 2) ** 2 != text_tokens
    torch.testing.assert_close(by_default.loss().loss, explicit.loss().loss)

    # The last block has no text output (context_pre_only): element 0 is None.
    text_of_last = LayerSync(transformer, "transformer_blocks.0[0]->transformer_blocks.2[0]")
    transformer(torch.randn(1, 3, 8, 8), torch.randn(1, 5, 8), torch.randn(1, 8), torch.tensor([1]))
    with pytest.raises(ConfigError, match=r"transformer_blocks.2\[0\].*not a tensor"):
        text_of_last.loss()


# ----------------------------------------------------------------------------- errors


def test_unequal_widths_are_a_config_error_naming_both_shapes():
    unet = tiny_unet_model()
    layersync = LayerSync(unet, pairs="down_blocks.0->mid_block")
    run_unet(unet)
    with pytest.raises(ConfigError) as err:
        layersync.loss()
    message = str(err.value)
    assert "(2, 32, 8, 8)" in message and "(2, 64, 4, 4)" in message
    assert "'down_blocks.0->up_blocks.2' (32 channels)" in message  # an equal-width suggestion


def test_unknown_layers_are_a_config_error_listing_valid_names():
    with pytest.raises(ConfigError) as err:
        LayerSync(tiny_unet_model(), pairs="down_blocks.7->mid_block")
    assert "down_blocks.7" in str(err.value)
    assert "down_blocks.1, down_blocks.2, mid_block, up_blocks.0" in str(err.value)
    with pytest.raises(ConfigError, match="blocks.0, blocks.1"):
        LayerSync(TokenStack(), pairs="blocks.1->layers.3")


def test_pairs_in_the_wrong_order_are_a_config_error():
    net = TokenStack()
    layersync = LayerSync(net, pairs="blocks.4->blocks.1")
    net(torch.randn(2, 5, 3))
    with pytest.raises(ConfigError, match="'blocks.1->blocks.4'"):
        layersync.loss()


@pytest.mark.parametrize("weight", [[0.2], [0.2, 0.2, 0.2], -0.1, float("nan"), "0.2", True])
def test_bad_weights_are_a_config_error(weight):
    with pytest.raises(ConfigError):
        LayerSync(TokenStack(), pairs="blocks.0->blocks.2,blocks.1->blocks.3", weight=weight)


# ----------------------------------------------------------------------------- with LISA


def test_with_lisa_in_one_training_step_the_losses_add_and_both_are_logged():
    unet = tiny_unet_model()
    branch = UNetControlNetBranch.from_main(unet, condition_downscale=1)
    side = branch.side_network
    lisa = LikelihoodScoreAlignment(side, out_channels=3, sample_size=SAMPLE_SIZE)
    layersync = LayerSync(side, pairs=default_pairs(side), weight=0.2)
    step = ControlTrainingStep(branch, make_objective("epsilon"), [lisa, layersync])
    assert step.needs_prior  # LISA's need; LayerSync adds none

    x0 = torch.randn(2, 3, SAMPLE_SIZE, SAMPLE_SIZE)
    out = step(x0, Context(torch.randn(2, 1, TEXT_DIM)), torch.rand(2, 3, SAMPLE_SIZE, SAMPLE_SIZE))

    logs = out.logs
    torch.testing.assert_close(
        out.loss.detach(),
        logs["diffusion_loss"] + logs["lisa/lisa_loss"] + logs["layersync/layersync_loss"],
    )
    cosine = logs["layersync/layersync_cos/down_blocks.1->down_blocks.2"]
    torch.testing.assert_close(logs["layersync/layersync_loss"], -0.2 * cosine)
    assert "lisa/aux_loss" in logs
    out.loss.backward()
    assert grad_norm(side.down_blocks[0]) > 0
    assert all(p.grad is None for p in unet.parameters())  # the main network stays frozen

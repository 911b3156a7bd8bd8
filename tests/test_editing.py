"""CODE and SDEdit (``lisa_control.editing``, ``lisa edit``): inversion round trips on tiny random
and shipped networks, the clipping, thresholding and Langevin formulas, seeding, the corruption
suite, PSNR/SSIM, and the command's outputs and one-line errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DConditionModel
from factories import make_pixel_model
from PIL import Image

from lisa_control.cli import main
from lisa_control.core.errors import ConfigError
from lisa_control.data.tasks import get_task
from lisa_control.editing import (
    CORRUPTIONS,
    Denoiser,
    code_edit,
    confidence_bound,
    confidence_clip,
    corrupt,
    decode,
    dynamic_threshold,
    invert,
    langevin,
    langevin_schedule,
    load_edit_model,
    make_denoiser,
    psnr,
    sdedit,
    ssim,
)
from lisa_control.editing.models import default_context
from lisa_control.eval.feature_distance import render
from lisa_control.families import get_family
from lisa_control.families.base import MainModel
from lisa_control.zoo.flow import tiny_sd3_transformer
from lisa_control.zoo.unet import tiny_unet


def tiny_unet_model(prediction_type: str = "epsilon") -> MainModel:
    """A random 16 x 16 pixel-space UNet without attention (fast on CPU)."""
    torch.manual_seed(1)
    config = tiny_unet(sample_size=16, block_out_channels=(16, 32), cross_attention_dim=16,
                       layers_per_block=1, norm_num_groups=8,
                       attention_at_full_resolution=False)  # fmt: skip
    unet = UNet2DConditionModel(**config).eval()
    scheduler = DDPMScheduler(prediction_type=prediction_type)
    return MainModel(unet, scheduler, get_family("unet"), resolution=16, objective=prediction_type)


def tiny_flow_model() -> MainModel:
    torch.manual_seed(1)
    net = tiny_sd3_transformer(sample_size=16, num_layers=2, num_attention_heads=2,
                               attention_head_dim=16).eval()  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler()
    return MainModel(net, scheduler, get_family("sd3"), resolution=16, objective="flow")


def images(n=2, size=16, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def round_trip(model, x, t0, steps):
    """Invert to t0 and decode back with clipping, thresholding and Langevin off."""
    denoiser = make_denoiser(model, default_context(model, x.shape[0], "cpu"))
    grid = denoiser.grid(t0, steps)
    return decode(denoiser, invert(denoiser, x, grid, eta=None), grid, threshold=None)


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize(
    "make,t0,steps,bound",
    [
        # measured max |error| over two random images: 0.030 (epsilon, 60 steps each way),
        # 0.029 (v, 100 steps), 0.0037 (flow, 200 steps to s = 1). The error is first order in
        # the step (about half with twice the steps); a random eps-network at deep t0 is far
        # worse (x0 = (x - sigma eps) / alpha amplifies its errors: 52 at t0 = 1, 100 steps).
        (lambda: tiny_unet_model("epsilon"), 0.3, 200, 0.05),
        (lambda: tiny_unet_model("v_prediction"), 0.5, 200, 0.05),
        (tiny_flow_model, 1.0, 200, 0.01),
    ],
    ids=["epsilon", "v_prediction", "flow"],
)
def test_invert_then_decode_returns_the_input_on_tiny_random_networks(make, t0, steps, bound):
    x = images()
    error = (round_trip(make(), x, t0, steps) - x).abs()
    assert error.max() < bound, error.max()


@pytest.mark.parametrize(
    "name,t0,steps,max_bound,mean_bound",
    [
        # 60 DDIM steps each way: measured max 0.064, mean 0.0042
        ("embedded:pose", 0.3, 200, 0.1, 0.008),
        # 100 Euler steps each way of the flow ODE: measured max 0.062, mean 0.0012
        ("embedded:pose_dit", 0.5, 200, 0.1, 0.003),
    ],
)
def test_invert_then_decode_returns_the_input_on_the_shipped_networks(
    name, t0, steps, max_bound, mean_bound
):
    model = load_edit_model(name)
    clean = render(get_task("pose"), seed=5, count=1)
    error = (round_trip(model, clean, t0, steps) - clean).abs()
    assert error.max() < max_bound, error.max()
    assert error.mean() < mean_bound, error.mean()


def test_code_edit_without_clipping_noise_and_corrections_is_the_round_trip():
    model, x = tiny_flow_model(), images()
    out = code_edit(model, x, t0=0.5, num_inference_steps=50, langevin_steps=0,
                    clip_encode=False, clip_decode=False, encode_noise=0.0)  # fmt: skip
    assert torch.allclose(out, round_trip(model, x, 0.5, 50).clamp(-1, 1), atol=1e-6)
    assert (out - x).abs().max() < 0.02  # measured 0.0074


def test_denoiser_conversions_match_the_training_objectives():
    """Given the true target at a grid point, x0-hat is the clean sample and eps-hat the noise
    that the training objective used, for every parametrization."""
    from lisa_control.core.objectives import make_objective

    x0, noise = images(3), torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    for kind in ("epsilon", "v_prediction", "flow"):
        scheduler = None if kind == "flow" else DDPMScheduler(prediction_type=kind)
        objective = make_objective(kind, scheduler)
        target = {}
        denoiser = Denoiser(lambda x, t, target=target: target["y"], kind,
                            None if scheduler is None else scheduler.alphas_cumprod)  # fmt: skip
        grid = denoiser.grid(0.3, 10)  # last point: t = 299 (DDPM) or s = 0.3 (flow)
        t = grid.timesteps[-1].item()
        timesteps = torch.full((3,), t) if kind == "flow" else torch.full((3,), int(t))
        batch = objective.sample(x0, noise=noise, timesteps=timesteps)
        target["y"] = batch.target
        x0_hat, eps_hat = denoiser.estimate(batch.x_t, grid, grid.steps)
        assert torch.allclose(x0_hat, x0, atol=1e-4), kind
        assert torch.allclose(eps_hat, noise, atol=1e-4), kind


# ----------------------------------------------------------------------------- formulas


def test_confidence_bound_and_clip_equal_the_formula():
    scheduler = DDPMScheduler()
    denoiser = Denoiser(lambda x, t: x, "epsilon", scheduler.alphas_cumprod)
    grid = denoiser.grid(0.5, 10)
    t = int(grid.timesteps[-1])
    assert t == 499
    abar = float(scheduler.alphas_cumprod[t])
    expected = math.sqrt(abar) + 1.7 * math.sqrt(1 - abar)
    got = confidence_bound(float(grid.alpha[-1]), float(grid.sigma[-1]), 1.7)
    assert got == pytest.approx(expected, rel=1e-6)
    x = torch.tensor([-5.0, -expected + 0.01, 0.0, 2 * expected])
    clipped = confidence_clip(x, float(grid.alpha[-1]), float(grid.sigma[-1]), 1.7)
    assert torch.allclose(clipped, torch.tensor([-expected, -expected + 0.01, 0.0, expected]))
    # Rectified flow: (1 - s) + eta s; with a latent bound B: B (1 - s) + eta s.
    flow = Denoiser(lambda x, t: x, "flow").grid(0.4, 10)
    s = float(flow.sigma[-1])
    assert s == pytest.approx(0.4)
    assert confidence_bound(float(flow.alpha[-1]), s, 1.7) == pytest.approx(0.6 + 1.7 * 0.4)
    assert confidence_bound(float(flow.alpha[-1]), s, 2.0, data_bound=3.0) == pytest.approx(2.6)


def test_inversion_clips_every_encoded_sample_to_its_bound():
    """A network predicting huge noise would throw x_t far out; each step is clipped back."""
    seen = []
    scheduler = DDPMScheduler()

    def predict(x, t):
        seen.append((int(t[0]), x.abs().max().item()))
        return torch.full_like(x, 50.0)

    denoiser = Denoiser(predict, "epsilon", scheduler.alphas_cumprod)
    grid = denoiser.grid(0.3, 20)
    out = invert(denoiser, images(1) * 3, grid, eta=1.7)
    abar = scheduler.alphas_cumprod.double()
    bound = {int(t): math.sqrt(abar[int(t)]) + 1.7 * math.sqrt(1 - abar[int(t)])
             for t in grid.timesteps[1:]}  # fmt: skip
    # The network sees the clipped input (|x| <= 1) first, then each clipped x_t at its t.
    assert seen[0][1] <= 1.0
    assert len(seen) == grid.steps
    for t, largest in seen[1:]:
        assert largest <= bound[t] + 1e-6
    assert out.abs().max().item() == pytest.approx(bound[int(grid.timesteps[-1])], rel=1e-5)


def test_langevin_schedule_anneals_in_stages():
    sizes, final = langevin_schedule(1e-4, 0.5, 10, anneal_stages=4, anneal_factor=0.8)
    base = 1e-4 * 100 ** (1 - 0.5)  # the per-timestep factor c(t0) = 100^(1 - t0)
    counts = [3, 3, 2, 2]
    expected = [base * 0.8**k for k in range(4) for _ in range(counts[k])]
    assert sizes == pytest.approx(expected)
    assert final == pytest.approx(base * 0.8**3)
    assert langevin_schedule(1e-4, 0.5, 0) == ([], None)


def test_langevin_update_equals_its_formula():
    """x <- x + a s + sqrt(2 a) z with s = -eps-hat / sigma_t, then x <- x + a s, by hand."""
    scheduler = DDPMScheduler()
    denoiser = Denoiser(lambda x, t: 0.5 * x + 0.1, "epsilon", scheduler.alphas_cumprod)
    grid = denoiser.grid(0.5, 10)
    sigma = float(grid.sigma[-1])
    x = images(2)
    sizes, final = [0.01, 0.008], 0.005
    out = langevin(denoiser, x, grid, sizes, final, torch.Generator().manual_seed(3),
                   threshold=None)  # fmt: skip
    g = torch.Generator().manual_seed(3)
    expected = x.clone()
    for a in sizes:
        z = torch.randn(x.shape, generator=g)
        score = -(0.5 * expected + 0.1) / sigma
        expected = expected + a * score + math.sqrt(2 * a) * z
    expected = expected + final * (-(0.5 * expected + 0.1) / sigma)
    assert torch.allclose(out, expected, atol=1e-6)


@pytest.mark.parametrize("kind", ["epsilon", "flow"])
def test_langevin_samples_the_noised_data_distribution(kind):
    """With the exact denoiser of x0 ~ N(mu, tau^2), the corrections sample
    x_t ~ N(alpha mu, alpha^2 tau^2 + sigma^2): the score's sign and scale are right."""
    mu, tau = 0.3, 0.2
    abar = DDPMScheduler().alphas_cumprod.double()

    def coefficients(x, t):
        shape = (-1,) + (1,) * (x.ndim - 1)
        if kind == "flow":
            s = (t.double() / 1000).view(shape)
            return 1 - s, s
        a = abar[t.long()].view(shape)
        return a.sqrt(), (1 - a).sqrt()

    def predict(x, t):
        a, s = coefficients(x, t)
        eps = s * (x - a * mu) / (a**2 * tau**2 + s**2)  # -sigma x (exact score)
        if kind == "flow":
            return (eps - (x - s * eps) / a).float()  # u = eps - x0
        return eps.float()

    denoiser = Denoiser(predict, kind, None if kind == "flow" else abar)
    grid = denoiser.grid(0.5, 10)
    a, s = float(grid.alpha[-1]), float(grid.sigma[-1])
    sizes, final = langevin_schedule(1e-3, 0.5, 800)
    out = langevin(denoiser, torch.zeros(8000, 1, 1, 1), grid, sizes, final,
                   torch.Generator().manual_seed(0), threshold=None)  # fmt: skip
    assert out.mean().item() == pytest.approx(a * mu, abs=0.03)
    assert out.std().item() == pytest.approx(math.sqrt(a**2 * tau**2 + s**2), rel=0.03)


def test_dynamic_threshold_equals_its_definition():
    """s = min(max(quantile_p |x0|, 1), max); x0 <- clamp(x0, -s, s) / s, per sample."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 3, 8, 8, generator=g)
    x0[0] *= 0.3  # inside [-1, 1]: s = 1, plain clipping (a no-op here)
    x0[1] *= 0.5  # quantile between 1 and 1.3
    x0[2] *= 3.0  # quantile above 1.3: s = 1.3
    got = dynamic_threshold(x0, 0.98, 1.3)
    for i in range(3):
        values = x0[i].numpy().ravel()
        s = float(np.quantile(np.abs(values), 0.98))
        s = min(max(s, 1.0), 1.3)
        expected = np.clip(values, -s, s) / s
        np.testing.assert_allclose(got[i].numpy().ravel(), expected, rtol=1e-5, atol=1e-6)
    scales = [min(max(float(np.quantile(np.abs(x0[i].numpy()), 0.98)), 1.0), 1.3) for i in range(3)]
    assert scales[0] == 1.0 and 1.0 < scales[1] < 1.3 and scales[2] == 1.3
    # A bound B thresholds x0 / B and scales back.
    np.testing.assert_allclose(dynamic_threshold(x0 * 4, 0.98, 1.3, data_bound=4.0).numpy(),
                               (got * 4).numpy(), rtol=1e-5, atol=1e-5)  # fmt: skip


def test_decoding_with_thresholding_stays_in_range():
    model = tiny_unet_model()
    x = images() * 3  # far outside the data range
    out = code_edit(model, x, t0=0.3, num_inference_steps=20, langevin_steps=2,
                    generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert out.shape == x.shape and out.abs().max() <= 1.0
    denoiser = make_denoiser(model, default_context(model, 2, "cpu"))
    grid = denoiser.grid(0.3, 20)
    raw = decode(denoiser, invert(denoiser, x, grid, eta=None), grid, threshold=(0.98, 1.3))
    assert raw.abs().max() <= 1.0 + 1e-6  # the last step returns the thresholded x0-hat


# ----------------------------------------------------------------------------- seeding, branches


@pytest.mark.parametrize("method", [code_edit, sdedit], ids=["code", "sdedit"])
def test_same_seed_same_output_and_seeds_differ(method):
    model = tiny_unet_model()
    x = images()
    kwargs = dict(t0=0.3, num_inference_steps=20)
    if method is code_edit:
        kwargs["langevin_steps"] = 4

    def run(seed):
        return method(model, x, generator=torch.Generator().manual_seed(seed), **kwargs)

    first, again, other = run(0), run(0), run(1)
    assert torch.equal(first, again)
    assert (first - other).abs().max() > 1e-3


def test_a_zero_initialised_controlnet_edits_as_the_main_network():
    """A fresh ControlNet adds zero residuals: the controlled prediction is the main one."""
    from lisa_control.families import UNetControlNetBranch

    model = tiny_unet_model()
    branch = UNetControlNetBranch.from_main(model.main_network, condition_downscale=1).eval()
    x = images()
    condition = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    kwargs = dict(t0=0.3, num_inference_steps=10, langevin_steps=2)
    plain = code_edit(model, x, generator=torch.Generator().manual_seed(0), **kwargs)
    guided = code_edit(model, x, generator=torch.Generator().manual_seed(0), branch=branch,
                       condition=condition, **kwargs)  # fmt: skip
    assert torch.allclose(plain, guided, atol=1e-5)
    with pytest.raises(ConfigError, match="both or neither"):
        code_edit(model, x, branch=branch, **kwargs)


@pytest.mark.parametrize("factory", ["make_sd_model", "make_sd3_model", "make_flux_model"])
def test_latent_models_edit_through_the_vae(factory, tmp_path):
    """Stable Diffusion (eps), SD3 (flow) and Flux (flow, packed latents, embedded guidance):
    edited on the VAE latent, with the range constraints off unless a latent bound is given."""
    import factories

    model = load_edit_model(str(getattr(factories, factory)(tmp_path)))
    x = images(1, size=64)
    kwargs = dict(t0=0.5, num_inference_steps=10, langevin_steps=2)
    out = code_edit(model, x, generator=torch.Generator().manual_seed(0), **kwargs)
    assert out.shape == x.shape and out.abs().max() <= 1.0
    bounded = code_edit(model, x, data_bound=0.5, generator=torch.Generator().manual_seed(0),
                        **kwargs)  # fmt: skip
    assert (bounded - out).abs().max() > 1e-4
    assert sdedit(model, x, t0=0.5, num_inference_steps=10).shape == x.shape


def test_ddpm_pipeline_folders_load_and_edit(tmp_path):
    from diffusers import DDIMScheduler, DDPMPipeline, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8)  # fmt: skip
    DDPMPipeline(unet=unet, scheduler=DDIMScheduler()).save_pretrained(tmp_path / "ddpm")
    model = load_edit_model(str(tmp_path / "ddpm"))
    assert model.family.name == "unet2d" and model.objective == "epsilon"
    x = images()
    out = code_edit(model, x, t0=0.3, num_inference_steps=10, langevin_steps=2,
                    generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert out.shape == x.shape


# ----------------------------------------------------------------------------- corruptions


@pytest.fixture(scope="module")
def renders():
    return render(get_task("pose"), seed=3, count=6)


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corruptions_change_images_deterministically_keeping_shape_and_range(name, renders):
    out = corrupt(renders, name, 3, seed=0)
    assert out.shape == renders.shape and out.dtype == renders.dtype
    assert out.min() >= -1 and out.max() <= 1
    assert (out - renders).abs().mean() > 0.01
    assert torch.equal(out, corrupt(renders, name, 3, seed=0))
    if name not in ("blur", "jpeg", "pixelate", "contrast"):  # the random ones
        assert not torch.equal(out, corrupt(renders, name, 3, seed=1))


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corruption_severity_increases_the_distance_to_the_clean_image(name, renders):
    distances = [(corrupt(renders, name, k, seed=0) - renders).abs().mean().item()
                 for k in range(1, 6)]  # fmt: skip
    assert all(a < b for a, b in zip(distances, distances[1:])), distances


def test_unknown_corruption_lists_the_valid_names():
    with pytest.raises(ConfigError, match="gaussian_noise, blur, jpeg"):
        corrupt(images(), "snow")
    with pytest.raises(ConfigError, match="severity"):
        corrupt(images(), "blur", severity=6)


# ----------------------------------------------------------------------------- metrics


def reference_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two (H, W) images in [0, 1] by explicit windows (11 x 11 Gaussian, std 1.5)."""
    x = np.arange(11) - 5.0
    w = np.exp(-0.5 * (x / 1.5) ** 2)
    w = np.outer(w, w) / np.outer(w, w).sum()
    values = []
    for i in range(a.shape[0] - 10):
        for j in range(a.shape[1] - 10):
            pa, pb = a[i : i + 11, j : j + 11], b[i : i + 11, j : j + 11]
            ma, mb = (w * pa).sum(), (w * pb).sum()
            va, vb = (w * (pa - ma) ** 2).sum(), (w * (pb - mb) ** 2).sum()
            cov = (w * (pa - ma) * (pb - mb)).sum()
            c1, c2 = 0.01**2, 0.03**2
            values.append((2 * ma * mb + c1) * (2 * cov + c2)
                          / ((ma**2 + mb**2 + c1) * (va + vb + c2)))  # fmt: skip
    return float(np.mean(values))


def test_ssim_and_psnr_match_their_definitions():
    a = images(1, size=16, seed=0)
    b = (a + 0.3 * images(1, size=16, seed=1)).clamp(-1, 1)
    expected = np.mean([reference_ssim((a[0, c].numpy() + 1) / 2, (b[0, c].numpy() + 1) / 2)
                        for c in range(3)])  # fmt: skip
    assert ssim(a, b).item() == pytest.approx(expected, rel=1e-4)
    assert ssim(a, a).item() == pytest.approx(1.0)
    mse = (((a + 1) / 2 - (b + 1) / 2) ** 2).mean().item()
    assert psnr(a, b).item() == pytest.approx(10 * math.log10(1 / mse), rel=1e-5)


# ----------------------------------------------------------------------------- the command


def write_renders(folder, count=3, seed=7):
    folder.mkdir(parents=True, exist_ok=True)
    task = get_task("pose")
    for i in range(count):
        Image.fromarray(task.sample(seed, i).image).save(folder / f"render{i}.png")
    return folder


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("lisa edit: error: "), err
    return err[0]


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--t0", "0"], "t0 must be in (0, 1]"),
        (["--t0", "1.5"], "t0 must be in (0, 1]"),
        (["--eta", "0"], "eta"),
        (["--corruption", "snow"], "unknown corruption 'snow'; choose one of: gaussian_noise"),
        (["--severity", "9", "--corruption", "fog"], "severity"),
        (["--controlnet", "x"], "--controlnet and --condition"),
    ],
)
def test_bad_settings_end_in_one_line(flags, message, tmp_path, capsys):
    inputs = write_renders(tmp_path / "in", count=1)
    argv = ["edit", "--pretrained_model_name_or_path", "embedded:pose", "--input", str(inputs),
            "--output_dir", str(tmp_path / "out"), *flags]  # fmt: skip
    assert main(argv) == 2
    assert message in one_line_error(capsys)


def test_bad_inputs_end_in_one_line(tmp_path, capsys):
    base = ["edit", "--pretrained_model_name_or_path", "embedded:pose",
            "--output_dir", str(tmp_path / "out")]  # fmt: skip
    assert main(base + ["--input", str(tmp_path / "missing")]) == 2
    assert "does not exist" in one_line_error(capsys)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    assert main(base + ["--input", str(tmp_path / "empty")]) == 2
    assert "no images in input folder" in one_line_error(capsys)
    odd = tmp_path / "odd"
    odd.mkdir()
    Image.new("RGB", (36, 32)).save(odd / "a.png")
    assert main(base + ["--input", str(odd)]) == 2
    assert "36 does not fit this model: give a positive multiple of 8" in one_line_error(capsys)
    inputs = write_renders(tmp_path / "in", count=1)
    assert main(base[:-1] + [str(inputs), "--input", str(inputs)]) == 2
    assert "would overwrite the inputs" in one_line_error(capsys)


@pytest.mark.parametrize("method", ["code", "sdedit"])
def test_command_writes_one_output_per_input_and_a_sheet(method, tmp_path, capsys):
    inputs = write_renders(tmp_path / "in", count=3)
    out = tmp_path / "out"
    code = main(["edit", "--pretrained_model_name_or_path", "embedded:pose", "--input",
                 str(inputs), "--output_dir", str(out), "--method", method, "--t0", "0.3",
                 "--num_inference_steps", "20", "--langevin_steps", "4", "--step_size", "1e-3",
                 "--corruption", "gaussian_noise", "--severity", "3",
                 "--device", "cpu"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    names = sorted(p.name for p in inputs.iterdir())
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == sorted(names + ["sheet.png"])
    assert sorted(p.name for p in (out / "corrupted").iterdir()) == names
    for name in names:
        before = np.asarray(Image.open(out / "corrupted" / name), dtype=np.float32)
        after = np.asarray(Image.open(out / name), dtype=np.float32)
        assert after.shape == before.shape == (32, 32, 3)
        assert np.abs(after - before).mean() > 2.0
    sheet = Image.open(out / "sheet.png")
    assert sheet.size == (3 * 34 + 2, 3 * 34 + 2)  # clean | corrupted | output, 3 rows


def test_command_edits_with_a_side_network_and_conditions(tmp_path, capsys):
    from lisa_control.families import UNetControlNetBranch

    model_dir = make_pixel_model(tmp_path / "model", resolution=16)
    model = load_edit_model(str(model_dir))
    branch = UNetControlNetBranch.from_main(model.main_network, condition_downscale=1)
    branch.save_side_network(tmp_path / "controlnet")
    inputs, conditions = tmp_path / "in", tmp_path / "cond"
    for folder in (inputs, conditions):
        folder.mkdir()
        for i in range(2):
            pixels = (images(1, seed=i)[0].permute(1, 2, 0).numpy() + 1) * 127.5
            Image.fromarray(pixels.round().astype(np.uint8)).save(folder / f"x{i}.png")
    out = tmp_path / "out"
    code = main(["edit", "--pretrained_model_name_or_path", str(model_dir),
                 "--input", str(inputs), "--output_dir", str(out),
                 "--controlnet", str(tmp_path / "controlnet"), "--condition", str(conditions),
                 "--num_inference_steps", "10", "--t0", "0.3", "--langevin_steps", "2",
                 "--device", "cpu"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["sheet.png", "x0.png", "x1.png"]
    assert Image.open(out / "sheet.png").size == (3 * 18 + 2, 2 * 18 + 2)  # input | cond | output

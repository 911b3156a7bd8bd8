"""`lisa pretrain` on the user's own images (``--train_data_dir``): a plain folder with awkward
files trains unconditionally, a captioned folder with a tiny CLIP trains on its captions and
saves the encoder for `lisa train`, and bad input is one line on stderr."""

import json

import numpy as np
import pytest
import torch
from factories import make_image_folder, tiny_clip
from PIL import Image

from lisa_control.cli import main
from lisa_control.families.loading import load_main_model

TINY = [
    "--resolution", "16", "--block_out_channels", "8", "16", "--layers_per_block", "1",
    "--train_batch_size", "2", "--max_train_steps", "4", "--lr_warmup_steps", "1",
    "--sample_every", "2", "--num_samples", "4", "--sample_steps", "2", "--device", "cpu",
]  # fmt: skip


def quirky_folder(folder):
    """RGBA, grayscale and palette images of odd sizes, one in a sub-folder, next to files
    that are no images (a text file, a hidden file)."""
    rng = np.random.default_rng(0)
    (folder / "more").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (20, 27, 4), dtype=np.uint8), "RGBA").save(
        folder / "rgba.png"
    )
    Image.fromarray(rng.integers(0, 256, (17, 17), dtype=np.uint8), "L").save(
        folder / "more" / "gray.png"
    )
    Image.fromarray(rng.integers(0, 256, (31, 19, 3), dtype=np.uint8)).convert("P").save(
        folder / "palette.gif"
    )
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / "x.JPG")
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.png").write_bytes(b"junk")
    return folder


def losses(out):
    return [json.loads(x) for x in (out / "loss_log.jsonl").read_text().splitlines()]


def test_a_plain_image_folder_trains_an_unconditional_network(tmp_path):
    from lisa_control.cli.pretrain import build_parser
    from lisa_control.training.pretrain import build_main_network

    data, out = quirky_folder(tmp_path / "data"), tmp_path / "run"
    assert main(["pretrain", *TINY, "--train_data_dir", str(data), "--output_dir", str(out)]) == 0
    records = losses(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) for r in records)
    points = [json.loads(x) for x in (out / "curve.jsonl").read_text().splitlines()]
    assert [p["step"] for p in points] == [2, 4] and "realism" not in points[0]
    assert (out / "samples" / "step-4.png").is_file() and (out / "training_curve.png").is_file()
    model = load_main_model(str(out / "model"))
    assert model.resolution == 16 and model.text_encoder is None and model.task is None
    record = json.loads((out / "model" / "lisa_model.json").read_text())
    assert record["images"] == 4 and record["data"] == str(data) and "text_encoder" not in record
    # the network as it was initialised (same seed, same flags) differs from the trained one
    torch.manual_seed(0)
    args = build_parser().parse_args([*TINY, "--train_data_dir", str(data), "--output_dir", "x"])
    initial = build_main_network(args)[0].state_dict()
    trained = model.main_network.state_dict()
    assert initial.keys() == trained.keys()
    assert any(not torch.equal(initial[k], trained[k]) for k in initial)


@pytest.fixture
def clip_folder(tmp_path):
    from transformers import CLIPTextModel

    folder = tmp_path / "clip"
    text_encoder, tokenizer = tiny_clip(folder, CLIPTextModel)
    text_encoder.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_captioned_folder_trains_on_text_and_lisa_train_uses_it(tmp_path, clip_folder):
    from lisa_control.families.encoders import FrozenEncoders

    data, out = make_image_folder(tmp_path / "data", n=4), tmp_path / "run"
    argv = ["pretrain", *TINY, "--train_data_dir", str(data), "--text_encoder", str(clip_folder),
            "--caption_column", "text", "--output_dir", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert all(np.isfinite(r["loss"]) for r in losses(out)) and len(losses(out)) == 4
    folder = out / "model"
    assert json.loads((folder / "lisa_model.json").read_text())["text_encoder"] == "text_encoder"
    model = load_main_model(str(folder))
    assert model.text_encoder is not None and model.tokenizer is not None
    assert model.main_network.config.cross_attention_dim == model.text_encoder.config.hidden_size
    # lisa train's encoders give each caption its own context
    encoders = FrozenEncoders(model, "cpu")
    a, b = (encoders.prompt_context([c]).encoder_hidden_states for c in ("item 0", "item 1"))
    assert a.shape[-1] == 16 and not torch.equal(a, b)
    train = ["train", "--pretrained_model_name_or_path", str(folder), "--train_data_dir",
             str(data), "--conditioning_image_column", "conditioning_image", "--caption_column",
             "text", "--resolution", "16", "--train_batch_size", "2", "--max_train_steps", "1",
             "--output_dir", str(tmp_path / "side"), "--no-progress"]  # fmt: skip
    assert main(train) == 0
    assert (tmp_path / "side" / "controlnet").is_dir()


def _corrupt_folder(root):
    folder = quirky_folder(root / "data")
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    return ["--train_data_dir", str(folder)]


def _truncated_folder(root):
    """A PNG cut short after its header passes the checks of the folder and fails decoding."""
    folder = quirky_folder(root / "data")
    Image.open(folder / "x.JPG").save(folder / "cut.png")
    (folder / "cut.png").write_bytes((folder / "cut.png").read_bytes()[:60])
    return ["--train_data_dir", str(folder)]


def _empty_folder(root):
    (root / "data").mkdir()
    (root / "data" / "notes.txt").write_text("no images here")
    return ["--train_data_dir", str(root / "data")]


def _not_clip(root):
    data = make_image_folder(root / "data", n=2)
    return ["--train_data_dir", str(data), "--text_encoder", str(data)]


def _no_caption_column(root):
    data = make_image_folder(root / "data", n=2)
    return ["--train_data_dir", str(data), "--text_encoder", str(root / "clip"),
            "--caption_column", "prompt"]  # fmt: skip


@pytest.mark.parametrize(
    "flags,message",
    [
        (lambda root: ["--task", "pose", "--train_data_dir", str(root)], "exclude each other"),
        (lambda root: ["--train_data_dir", str(root / "nowhere")], "does not exist"),
        (_empty_folder, "no image files"),
        (_corrupt_folder, "does not recognise it as an image"),
        (_truncated_folder, "1 of 5 images cannot be used"),
        (_not_clip, "not a CLIP text model"),
        (_no_caption_column, "no column 'prompt'"),
        (
            lambda root: ["--train_data_dir", str(root), "--caption_column", "text"],
            "needs --text_encoder",
        ),
    ],
    ids=[
        "task-and-data",
        "missing",
        "empty",
        "corrupt",
        "truncated",
        "not-clip",
        "no-caption",
        "no-encoder",
    ],  # fmt: skip
)
def test_bad_input_is_one_line_before_any_output(tmp_path, clip_folder, capsys, flags, message):
    out = tmp_path / "run"
    argv = ["pretrain", *TINY, *flags(tmp_path), "--output_dir", str(out)]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lisa pretrain: error:") and message in err, err
    assert len(err.splitlines()) == 1, err
    assert not out.exists()

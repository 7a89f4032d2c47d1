"""Stage one (unistd_hf/pretrain.py): MAE masking and loss, a tiny run, resume, the saved checkpoint, the shipped file."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import CLIPVisionModel

from unistd_hf.configuration_unistd import TaskSpec, UniSTDConfig
from unistd_hf.modeling_unistd import UniSTDModel
from unistd_hf.modules import sincos_2d_position_encoding
from unistd_hf.pretrain import (
    PACKAGED_BACKBONE,
    PACKAGED_BACKBONE_DIR,
    CLIPMaskedAutoencoder,
    PretrainArguments,
    latest_checkpoint,
    load_backbone,
    main,
    masked_patch_loss,
    patch_targets,
    patchify,
    pretrain,
    random_masking,
    resolve_backbone,
    sha256_of,
    unpatchify,
)
from helpers import tiny_clip_config


def tiny_args(output_dir: Path, **overrides) -> PretrainArguments:
    """A model and run small enough for one core: 16 patches of 8x8 on 32x32 crops."""
    settings = dict(
        output_dir=str(output_dir), width=32, layers=2, heads=4, patch_size=8, image_size=32, decoder_width=32,
        decoder_layers=1, decoder_heads=4, batch_size=16, max_steps=60, warmup_steps=5, learning_rate=3e-3,
        log_every=10, eval_every=30, checkpoint_every=30, num_heldout_crops=16, seed=3, num_threads=1,
    )
    return PretrainArguments(**{**settings, **overrides})


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, dict]:
    output = tmp_path_factory.mktemp("mae")
    report = pretrain(tiny_args(output))
    return output, report


# --- the objective -----------------------------------------------------------------------------------------------


def test_random_masking_hides_the_ratio_with_an_independent_mask_per_sample():
    ids_keep, mask = random_masking(8, 64, 0.75, torch.Generator().manual_seed(0))
    assert ids_keep.shape == (8, 16) and mask.shape == (8, 64)
    assert torch.equal(mask.sum(1), torch.full((8,), 48.0))  # 75% of 64 hidden in every sample
    for row in range(8):  # the kept indices are exactly the visible patches, without repeats
        assert len(set(ids_keep[row].tolist())) == 16
        assert torch.equal(mask[row, ids_keep[row]], torch.zeros(16))
    assert len({tuple(m.tolist()) for m in mask}) == 8  # per-sample masks differ
    again = random_masking(8, 64, 0.75, torch.Generator().manual_seed(0))[1]
    assert torch.equal(again, mask)  # a seed fixes them (resume relies on it)
    assert not torch.equal(random_masking(8, 64, 0.75, torch.Generator().manual_seed(1))[1], mask)
    # uniform: over many samples every patch is hidden about 75% of the time
    frequency = random_masking(4000, 64, 0.75, torch.Generator().manual_seed(2))[1].mean(0)
    assert (frequency - 0.75).abs().max() < 0.04
    assert random_masking(2, 10, 0.5)[1].sum(1).tolist() == [5.0, 5.0]


def test_masked_loss_matches_a_direct_computation_and_ignores_visible_patches():
    g = torch.Generator().manual_seed(0)
    predictions = torch.randn(3, 16, 12, generator=g, requires_grad=True)
    targets = torch.randn(3, 16, 12, generator=g)
    _, mask = random_masking(3, 16, 0.75, g)
    errors = [((predictions[b, n] - targets[b, n]) ** 2).mean() for b in range(3) for n in range(16) if mask[b, n]]
    direct = torch.stack(errors).mean()
    loss = masked_patch_loss(predictions, targets, mask)
    torch.testing.assert_close(loss, direct)
    loss.backward()
    visible = mask == 0
    assert predictions.grad[visible].abs().max() == 0  # visible patches do not count
    assert predictions.grad[~visible].abs().min() > 0


def test_patchify_order_and_normalised_targets():
    images = torch.rand(2, 3, 16, 24)
    patches = patchify(images, 8)  # (2, 6, 192): a 2 x 3 grid in row-major order
    assert patches.shape == (2, 6, 8 * 8 * 3)
    row, col = 1, 2
    direct = images[1, :, row * 8 : (row + 1) * 8, col * 8 : (col + 1) * 8].permute(1, 2, 0).reshape(-1)
    torch.testing.assert_close(patches[1, row * 3 + col], direct)
    torch.testing.assert_close(unpatchify(patches, 8, 16, 24), images)
    # the patch order is the one of CLIP's conv patch embedding
    conv = torch.nn.Conv2d(3, 5, 8, 8, bias=False)
    by_conv = conv(images).flatten(2).transpose(1, 2)  # (2, 6, 5)
    by_patches = patches @ conv.weight.permute(0, 2, 3, 1).reshape(5, -1).T
    torch.testing.assert_close(by_conv, by_patches, rtol=1e-4, atol=1e-5)
    normalised = patch_targets(images, 8, normalize=True)
    torch.testing.assert_close(normalised.mean(-1), torch.zeros(2, 6), atol=1e-5, rtol=0)
    assert ((normalised.var(-1) - 1).abs() < 0.01).all()  # unit variance up to the small eps
    torch.testing.assert_close(patch_targets(images, 8, normalize=False), patches)


def test_encoder_sees_only_visible_patches_and_the_loss_counts_only_hidden_ones():
    torch.manual_seed(0)
    model = CLIPMaskedAutoencoder(CLIPVisionModel(tiny_clip_config()), decoder_width=32, decoder_layers=1)
    images = torch.rand(4, 3, 32, 32)
    ids_keep, mask = random_masking(4, 16, 0.75, torch.Generator().manual_seed(0))
    loss, predictions = model(images, ids_keep, mask)
    torch.testing.assert_close(loss, masked_patch_loss(predictions, patch_targets(images, 8, True), mask))
    # changing the pixels of hidden patches changes the targets, not the predictions: the encoder never saw them
    hidden_pixels = unpatchify(mask[..., None].expand(-1, -1, 192), 8, 32, 32).bool()
    noisy = torch.where(hidden_pixels, torch.rand_like(images), images)
    _, predictions_noisy = model(noisy, ids_keep, mask)
    torch.testing.assert_close(predictions_noisy, predictions)
    # grid offsets: patch (i, j) of a crop at offset (r, c) gets the sin-cos code of cell (r + i, c + j) of a 16 x 16 grid
    placed = CLIPMaskedAutoencoder(CLIPVisionModel(tiny_clip_config()), decoder_width=32, decoder_layers=1, position_grid=16)
    offsets = torch.tensor([[0, 0], [3, 12], [12, 5], [7, 7]])
    positions = placed.token_positions(offsets)  # (4, 16, 32)
    table = sincos_2d_position_encoding(16, 16, 32)
    for b, (r, c) in enumerate(offsets.tolist()):
        for i in range(4):
            for j in range(4):
                torch.testing.assert_close(positions[b, i * 4 + j], table[(r + i) * 16 + c + j])
    torch.testing.assert_close(positions[0], placed.token_positions(None))  # offset 0 = CLIP's own (sin-cos) table
    with pytest.raises(ValueError, match="offsets must lie in"):
        placed.token_positions(torch.tensor([[13, 0]]))
    loss.backward()  # the encoder layers (what UniSTD keeps) learn
    assert model.encoder.encoder.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert model.encoder.embeddings.position_embedding.weight.requires_grad is False  # fixed sin-cos


# --- a tiny run, its outputs, resume -----------------------------------------------------------------------------


def test_tiny_run_lowers_the_heldout_loss_and_writes_its_outputs(tiny_run):
    output, report = tiny_run
    heldout = report["heldout"]
    assert heldout["pretrained"] < 0.8 * heldout["never_trained"]
    history = [h["loss"] for h in report["heldout_history"]]
    assert [h["step"] for h in report["heldout_history"]] == [0, 30, 60] and history[-1] < history[0]
    assert report["steps"] == 60 and "coffee" in report["heldout_images"] and report["num_train_images"] > 10
    for name in ("loss_curve.png", "reconstructions.png", "report.md", "logs.jsonl", "backbone/SHA256SUMS"):
        assert (output / name).is_file(), name
    assert json.loads((output / "report.json").read_text())["heldout"] == heldout
    assert len((output / "logs.jsonl").read_text().splitlines()) == 6
    assert latest_checkpoint(output).name == "step-00000060"


def test_saved_backbone_loads_in_a_fresh_process_and_unistd_builds_on_it(tiny_run):
    output, _ = tiny_run
    backbone = output / "backbone"
    assert not list(backbone.glob("*.bin")) and not list(backbone.glob("*.pt"))  # safetensors only
    code = (
        "import sys, torch; from transformers import CLIPVisionModel;"
        "m = CLIPVisionModel.from_pretrained(sys.argv[1], use_safetensors=True);"
        "print(m.config.hidden_size, m.config.num_hidden_layers, float(sum(p.double().sum() for p in m.parameters())))"
    )
    done = subprocess.run([sys.executable, "-c", code, str(backbone)], capture_output=True, text=True, timeout=300,
                          env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    width, layers, total = done.stdout.split()
    saved = load_file(str(backbone / "model.safetensors"))
    assert (int(width), int(layers)) == (32, 2)
    assert float(total) == pytest.approx(float(sum(t.double().sum() for t in saved.values())), rel=1e-9)

    spec = TaskSpec("toy", 2, 1, 1, 16, 16, num_downsample=1)
    model = UniSTDModel(UniSTDConfig(backbone=str(backbone), tasks=[spec], hidden_channels=8))
    torch.testing.assert_close(model.backbone.encoder.layers[1].mlp.fc1.weight, saved["encoder.layers.1.mlp.fc1.weight"])
    out = model(pixel_values=torch.rand(2, 2, 1, 16, 16), task="toy", labels=torch.rand(2, 1, 1, 16, 16))
    assert out.predictions.shape == (2, 1, 1, 16, 16) and torch.isfinite(out.loss)


def test_resume_after_a_stop_ends_where_an_uninterrupted_run_ends(tmp_path):
    short = dict(max_steps=8, checkpoint_every=3, eval_every=4, log_every=2, num_heldout_crops=8, batch_size=8)
    straight = pretrain(tiny_args(tmp_path / "straight", **short))
    # stopped at step 5 as a kill would: the checkpoint of step 3 survives, steps 4-5 are lost and redone
    assert pretrain(tiny_args(tmp_path / "resumed", stop_after_step=5, **short)) is None
    assert latest_checkpoint(tmp_path / "resumed").name == "step-00000003"
    assert not (tmp_path / "resumed" / "backbone").exists()
    resumed = pretrain(tiny_args(tmp_path / "resumed", resume_from_checkpoint="latest", **short))
    a = load_file(str(tmp_path / "straight" / "backbone" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "backbone" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["heldout_history"] == straight["heldout_history"]
    # a different run into the same folder is refused before anything is written
    with pytest.raises(ValueError, match="holds a different run"):
        pretrain(tiny_args(tmp_path / "resumed", width=64, **short))


def test_decoder_only_control_leaves_the_encoder_at_its_initialisation(tmp_path):
    from unistd_hf.pretrain import build_autoencoder

    args = tiny_args(tmp_path / "control", train_encoder=False, max_steps=3, eval_every=0, num_heldout_crops=8, batch_size=8)
    report = pretrain(args)
    saved = load_file(str(tmp_path / "control" / "backbone" / "model.safetensors"))
    initial = build_autoencoder(args).encoder.state_dict()
    assert all(torch.equal(saved[k], initial[k]) for k in saved)
    assert report["heldout"]["pretrained"] != report["heldout"]["never_trained"]  # the decoder did learn


def test_command_line_errors_exit_2_before_any_work(tmp_path, capsys):
    assert main(["--output_dir", str(tmp_path / "x"), "--image_size", "30", "--patch_size", "8"]) == 2
    assert "multiple of --patch_size" in capsys.readouterr().err
    assert main(["--output_dir", str(tmp_path / "y"), "--mask_ratio", "1.0"]) == 2
    assert main(["--output_dir", str(tmp_path / "z"), "--image_folder", str(tmp_path / "missing"),
                 "--bundled_images", "false"]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_image_folder_and_hf_dataset_sources(tmp_path):
    """The same command reads a user's images: a folder (recursively) and a `datasets` save_to_disk folder."""
    import datasets
    import numpy as np
    from PIL import Image

    from unistd_hf.pretrain import image_pools

    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 255, (40 + i, 50, 3), dtype=np.uint8) for i in range(5)]
    for i, array in enumerate(arrays):
        (tmp_path / "imgs" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(tmp_path / "imgs" / f"c{i % 2}" / f"{i}.png")
    datasets.Dataset.from_dict({"image": [Image.fromarray(a) for a in arrays]}).cast_column(
        "image", datasets.Image()).save_to_disk(str(tmp_path / "ds"))
    args = tiny_args(tmp_path / "out", bundled_images=False, image_folder=str(tmp_path / "imgs"),
                     hf_dataset=str(tmp_path / "ds"), heldout_fraction=0.2)
    train, heldout = image_pools(args)
    assert (len(train), len(heldout)) == (8, 2)
    names = train.names + heldout.names
    assert sorted(n for n in names if n.endswith(".png")) == sorted(f"c{i % 2}/{i}.png" for i in range(5))
    assert sum(n.endswith("]") for n in names) == 5  # ds[0] ... ds[4]
    image = train[0]
    assert image.shape[0] == 3 and 0 <= image.min() and image.max() <= 1


# --- the shipped backbone ----------------------------------------------------------------------------------------


def test_packaged_backbone_is_the_default_training_size_and_verified():
    path = Path(resolve_backbone(PACKAGED_BACKBONE))
    assert path == PACKAGED_BACKBONE_DIR
    sums = dict(line.split()[::-1] for line in (path / "SHA256SUMS").read_text().splitlines())
    assert sums["model.safetensors"] == sha256_of(path / "model.safetensors")
    assert (path / "model.safetensors").stat().st_size < 5 * 2**20
    config = json.loads((path / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]) == (128, 4, 4)
    assert config["intermediate_size"] == 512  # the random CLIP of the default training run has 4 * width
    assert "python -m unistd_hf.pretrain" in (path / "README.md").read_text()


def test_tampered_backbone_is_refused(tmp_path):
    copy = tmp_path / "clip"
    shutil.copytree(PACKAGED_BACKBONE_DIR, copy)
    assert resolve_backbone(copy) == str(copy)  # an intact copy verifies
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF  # one flipped byte inside a weight
    (copy / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256 mismatch"):
        resolve_backbone(copy)
    with pytest.raises(ValueError, match="sha256 mismatch"):
        load_backbone(copy)


def test_packaged_backbone_loads_without_pickle(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the backbone must not be loaded through pickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    backbone = load_backbone(PACKAGED_BACKBONE)
    saved = load_file(str(PACKAGED_BACKBONE_DIR / "model.safetensors"))
    torch.testing.assert_close(backbone.encoder.layers[3].self_attn.v_proj.weight, saved["encoder.layers.3.self_attn.v_proj.weight"])
    spec = TaskSpec("toy", 2, 1, 1, 16, 16, num_downsample=1)
    model = UniSTDModel(UniSTDConfig(backbone=resolve_backbone(PACKAGED_BACKBONE), tasks=[spec], hidden_channels=8))
    assert model.width == 128

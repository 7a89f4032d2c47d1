"""Stage one: task-agnostic masked-autoencoder (MAE) pretraining of a CLIP vision encoder on offline 2D images.

    python -m unistd_hf.pretrain --output_dir outputs/clip-mae --max_steps 2000
    accelerate launch -m unistd_hf.pretrain --image_folder /data/imagenet/train --bundled_images false

UniSTD freezes a pretrained 2D Transformer; without a hub there is none, so this module makes one the way the field
does (He et al., "Masked Autoencoders Are Scalable Vision Learners"): random resized crops of natural images are cut
into patches, 75% of the patches of each crop are hidden (a fresh random mask per crop), the encoder sees only the
visible ones and a small decoder, discarded at the end, predicts the pixels of the hidden ones. The loss is the MSE
on hidden patches only, against per-patch normalised pixels by default.

The encoder is a transformers `CLIPVisionModel` used through its own patch embedding, position embedding,
`pre_layrnorm` and `encoder` (UniSTD later uses `pre_layrnorm` and `encoder`). With `--position_embedding sincos`
(the default) its position embedding is fixed to the same 2D sine-cosine code UniSTD adds to its tokens
(`unistd_hf.modules.sincos_2d_position_encoding`), and no class token is used, as in UniSTD, so the encoder layers
learn on the token layout they will see later; each crop's patch grid is placed at a random offset in a 16 x 16
grid (`--position_grid`), so that small crops teach the positions of UniSTD's 16 x 16 token grids too. The images never include forecasting data: the natural images bundled
with scikit-image and scikit-learn (no download), plus `--image_folder` / `--hf_dataset` where a user has more.

Outputs in `output_dir`: `backbone/` (an ordinary CLIP vision checkpoint: config.json, model.safetensors,
SHA256SUMS), `report.json` / `report.md` (held-out reconstruction loss vs a never-trained model), `loss_curve.png`,
`reconstructions.png`, `logs.jsonl`, and `checkpoints/step-*` (Accelerate state: model weights in safetensors; the
optimizer and scheduler state are written by `torch.save`, i.e. pickle, as Accelerate does, and only ever read back
by `--resume_from_checkpoint` from a folder this command wrote).

The project ships one backbone made by this command (`PACKAGED_BACKBONE`, see `unistd_hf/pretrained/clip-mae-tiny/
README.md` and docs/PRETRAINING.md); `resolve_backbone` maps its name to the installed folder after checking the
sha256 recorded beside it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import CLIPVisionConfig, CLIPVisionModel

from .atomic import TRAINER_STATE, check_writable, latest_checkpoint, write_atomically, write_checkpoint
from .modules import sincos_2d_position_encoding

__all__ = [
    "PACKAGED_BACKBONE",
    "PACKAGED_BACKBONE_DIR",
    "PretrainArguments",
    "MAEDecoder",
    "CLIPMaskedAutoencoder",
    "random_masking",
    "patchify",
    "unpatchify",
    "patch_targets",
    "masked_patch_loss",
    "bundled_images",
    "resolve_backbone",
    "load_backbone",
    "verify_checksums",
    "write_checksums",
    "pretrain",
    "main",
]

# The backbone shipped in the package data; `resolve_backbone(PACKAGED_BACKBONE)` returns its folder.
PACKAGED_BACKBONE = "unistd-hf/clip-mae-tiny"
PACKAGED_BACKBONE_DIR = Path(__file__).resolve().parent / "pretrained" / "clip-mae-tiny"
CHECKSUM_FILE = "SHA256SUMS"
CHECKSUMMED_FILES = ("config.json", "model.safetensors")
# Added to a patch's pixel variance (pixels in [0, 1]) before normalising: keeps flat patches from turning
# 8-bit quantisation noise into unit-variance targets.
NORM_PIX_EPS = 1e-4
# Held-out crops and their masks are drawn from this fixed seed, so every run (any --seed) is scored on the same set.
HELDOUT_SEED = 20250
# scikit-image images held out from training (whole images, so held-out crops are unseen content), and sklearn's china.
HELDOUT_BUNDLED = ("coffee", "clock", "china")
# Natural (and a few scientific) images that ship inside scikit-image / scikit-learn: no download, no pooch.
# Excluded: 'horse' (a binary silhouette), 'cat' (same picture as 'chelsea'), 'logo' (RGBA drawing), 'page'/'text'
# (scanned text), 'microaneurysms' (102 x 102).
SKIMAGE_IMAGES = (
    "astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon", "immunohistochemistry",
    "hubble_deep_field", "retina", "colorwheel", "grass", "gravel", "brick", "clock", "cell", "stereo_motorcycle",
)
SKLEARN_IMAGES = ("china", "flower")
# Images are first shrunk so their shorter side is at most this many crop sizes (smallest crops stay near native scale).
MAX_SHORT_SIDE_FACTOR = 4
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
# Arguments that do not change what a run computes (a resume may change them).
NON_DEFINING_ARGS = ("resume_from_checkpoint", "stop_after_step", "overwrite_output_dir", "log_every",
                     "export_dir", "num_threads", "keep_checkpoints")


@dataclass
class PretrainArguments:
    """Everything `pretrain()` needs; each field is also a command-line flag of `python -m unistd_hf.pretrain`."""

    output_dir: str = field(default="outputs/clip-mae", metadata={"help": "Where the backbone, report and checkpoints go."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Start a different run in a used output_dir."})
    # encoder (the CLIP vision model that is kept)
    width: int = field(default=128, metadata={"help": "hidden_size of the CLIP encoder."})
    layers: int = field(default=4, metadata={"help": "num_hidden_layers of the CLIP encoder."})
    heads: int = field(default=4, metadata={"help": "num_attention_heads of the CLIP encoder."})
    mlp_ratio: int = field(default=4, metadata={"help": "intermediate_size = mlp_ratio * width."})
    patch_size: int = field(default=8, metadata={"help": "Patch size in pixels."})
    image_size: int = field(default=64, metadata={"help": "Crop size in pixels (a multiple of patch_size)."})
    position_embedding: str = field(
        default="sincos",
        metadata={"help": "'sincos': fixed 2D sin-cos (the code UniSTD adds to its tokens); 'learned': CLIP's own."},
    )
    position_grid: int = field(
        default=16,
        metadata={"help": "With sincos positions: each crop's patch grid sits at a random offset in a grid this large, "
                  "so the encoder learns positions up to the token grids UniSTD uses (16 x 16 for the default 64 x 64 "
                  "tasks) on small crops. 0: the crop's own grid."},
    )
    # decoder (discarded at the end)
    decoder_width: int = field(default=64, metadata={"help": "Width of the MAE decoder."})
    decoder_layers: int = field(default=2, metadata={"help": "Transformer blocks of the MAE decoder."})
    decoder_heads: int = field(default=4, metadata={"help": "Attention heads of the MAE decoder."})
    train_encoder: bool = field(
        default=True,
        metadata={"help": "False: a control run in which only the decoder learns, on the encoder's random init (how much "
                  "of the reconstruction the encoder's own pretraining accounts for; docs/PRETRAINING.md)."},
    )
    # objective
    mask_ratio: float = field(default=0.75, metadata={"help": "Fraction of patches hidden from the encoder."})
    norm_pix_loss: bool = field(default=True, metadata={"help": "Targets are per-patch normalised pixels (as MAE)."})
    # data
    bundled_images: bool = field(default=True, metadata={"help": "Use the images bundled with scikit-image/-learn."})
    image_folder: str | None = field(default=None, metadata={"help": "A folder of images (searched recursively)."})
    hf_dataset: str | None = field(
        default=None, metadata={"help": "A local `datasets` image dataset: a save_to_disk folder or a load_dataset name."}
    )
    hf_split: str = field(default="train", metadata={"help": "Split of --hf_dataset."})
    heldout_fraction: float = field(
        default=0.05, metadata={"help": "Images of --image_folder/--hf_dataset held out (the bundled hold out fixed ones)."}
    )
    num_heldout_crops: int = field(default=64, metadata={"help": "Fixed held-out crops scored for the report."})
    min_crop_scale: float = field(default=0.05, metadata={"help": "Smallest crop area as a fraction of the image."})
    grey_probability: float = field(default=0.25, metadata={"help": "Probability that a crop is turned grey."})
    color_jitter: float = field(default=0.3, metadata={"help": "Brightness/contrast/saturation jitter strength."})
    # optimisation
    batch_size: int = field(default=32, metadata={"help": "Crops per batch and process."})
    max_steps: int = field(default=2500, metadata={"help": "Optimizer steps."})
    learning_rate: float = field(default=1.5e-3, metadata={"help": "AdamW peak learning rate."})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay."})
    warmup_steps: int = field(default=100, metadata={"help": "Linear warm-up steps, then cosine decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0: off)."})
    seed: int = field(default=0, metadata={"help": "Seed of initialisation, crops and masks."})
    mixed_precision: str = field(default="no", metadata={"help": "'no', 'fp16' or 'bf16' (through Accelerate)."})
    cpu: bool = field(default=False, metadata={"help": "Run on CPU even when a GPU is present."})
    num_threads: int = field(default=0, metadata={"help": "torch CPU threads (0: leave as set by torch/OMP)."})
    # bookkeeping
    log_every: int = field(default=20, metadata={"help": "Log (JSON lines, loss curve) every N steps."})
    eval_every: int = field(default=250, metadata={"help": "Score the held-out crops every N steps (0: only at the end)."})
    checkpoint_every: int = field(default=500, metadata={"help": "Checkpoint every N steps (0: only at the end)."})
    keep_checkpoints: int = field(default=2, metadata={"help": "Checkpoints kept on disk."})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "A checkpoint folder or 'latest'."})
    export_dir: str | None = field(
        default=None, metadata={"help": "Also copy the backbone here with a README of the run (how the shipped one is made)."}
    )
    stop_after_step: int = field(default=0, metadata={"help": "Testing aid: stop as if killed after this step."})


# ---------------------------------------------------------------------------------------------------------------------
# The MAE objective: masks, patch targets, loss


def num_visible_patches(num_patches: int, mask_ratio: float) -> int:
    """Patches each crop shows the encoder: int(N * (1 - ratio)), as MAE; at least one."""
    return max(1, int(num_patches * (1.0 - mask_ratio)))


def random_masking(
    batch_size: int, num_patches: int, mask_ratio: float, generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """An independent uniformly random mask per crop.

    Returns:
        ids_keep: (B, K) indices of the visible patches (K = num_visible_patches), in random order.
        mask: (B, N) float, 1 for a hidden patch, 0 for a visible one.
    """
    keep = num_visible_patches(num_patches, mask_ratio)
    noise = torch.rand(batch_size, num_patches, generator=generator)  # (B, N), on CPU so a seed fixes it anywhere
    ids_keep = noise.argsort(dim=1)[:, :keep]  # (B, K)
    mask = torch.ones(batch_size, num_patches)
    mask.scatter_(1, ids_keep, 0.0)
    return ids_keep.to(device), mask.to(device)


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p*p*C), patches in row-major order (the order of CLIP's conv patch embedding)."""
    B, C, H, W = images.shape
    p = patch_size
    if H % p or W % p:
        raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {p}")
    x = images.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)  # (B, h, w, p, p, C)
    return x.reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(patches: torch.Tensor, patch_size: int, height: int, width: int, channels: int = 3) -> torch.Tensor:
    """Inverse of `patchify`: (B, N, p*p*C) -> (B, C, H, W)."""
    B = patches.shape[0]
    p = patch_size
    x = patches.reshape(B, height // p, width // p, p, p, channels).permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p, w, p)
    return x.reshape(B, channels, height, width)


def patch_targets(images: torch.Tensor, patch_size: int, normalize: bool) -> torch.Tensor:
    """What the decoder predicts for each patch: its pixels, normalised per patch when `normalize` (MAE's norm_pix)."""
    target = patchify(images, patch_size)  # (B, N, p*p*C)
    if normalize:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + NORM_PIX_EPS) ** 0.5
    return target


def masked_patch_loss(predictions: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over hidden patches of the per-patch MSE; visible patches do not count."""
    per_patch = (predictions.float() - targets.float()).pow(2).mean(dim=-1)  # (B, N)
    return (per_patch * mask).sum() / mask.sum()


# ---------------------------------------------------------------------------------------------------------------------
# The model: CLIP encoder on visible patches + a small decoder


def clip_config(args: PretrainArguments) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=args.width, intermediate_size=args.mlp_ratio * args.width, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, patch_size=args.patch_size, image_size=args.image_size, num_channels=3,
    )


class MAEDecoder(nn.Module):
    """Visible-token features -> pixels of every patch: linear in, mask tokens, sin-cos positions, blocks, linear out.

    Args:
        encoder_width: width of the encoder tokens.
        width: decoder width.
        layers: pre-norm transformer blocks.
        heads: attention heads.
        grid: (h, w) patch grid.
        patch_dim: p*p*C values predicted per patch.
    """

    def __init__(self, encoder_width: int, width: int, layers: int, heads: int, grid: tuple[int, int], patch_dim: int) -> None:
        super().__init__()
        self.grid = grid
        self.encoder_norm = nn.LayerNorm(encoder_width)  # MAE's final encoder norm; CLIP's encoder ends without one
        self.embed = nn.Linear(encoder_width, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        nn.init.normal_(self.mask_token, std=0.02)
        self.register_buffer("position", sincos_2d_position_encoding(*grid, width), persistent=False)  # (N, Dd)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True,
                                       norm_first=True)
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, patch_dim)

    def forward(self, visible: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """visible (B, K, D), ids_keep (B, K) -> predictions (B, N, patch_dim)."""
        x = self.embed(self.encoder_norm(visible))  # (B, K, Dd)
        B, K, Dd = x.shape
        N = self.position.shape[0]
        full = self.mask_token.expand(B, N, Dd).to(x.dtype).clone()  # (B, N, Dd)
        full = full.scatter(1, ids_keep.unsqueeze(-1).expand(B, K, Dd), x)
        full = full + self.position.to(x.dtype)
        for block in self.blocks:
            full = block(full)
        return self.head(self.norm(full))  # (B, N, patch_dim)


class CLIPMaskedAutoencoder(nn.Module):
    """A `CLIPVisionModel` (kept) and an `MAEDecoder` (discarded), trained to fill in hidden patches.

    Args:
        encoder: the CLIP vision model; its patch embedding, position embedding, pre_layrnorm and encoder run.
        decoder_width / decoder_layers / decoder_heads: the decoder's size.
        sincos_positions: fix the encoder's position embedding to the 2D sin-cos code (frozen).
        position_grid: side of the sin-cos grid a crop's patch grid may be placed in (`offsets` of `forward`);
            0 or the crop's own grid side: no offsets.
    """

    def __init__(self, encoder: CLIPVisionModel, decoder_width: int = 128, decoder_layers: int = 2,
                 decoder_heads: int = 4, sincos_positions: bool = True, position_grid: int = 0) -> None:
        super().__init__()
        config = encoder.config
        if config.image_size % config.patch_size:
            raise ValueError(f"image_size {config.image_size} is not a multiple of patch_size {config.patch_size}")
        self.encoder = encoder
        self.patch_size = config.patch_size
        side = config.image_size // config.patch_size
        self.grid = (side, side)
        self.num_patches = side * side
        self.position_grid = max(side, position_grid)
        if self.position_grid > side and not sincos_positions:
            raise ValueError("a position grid larger than the crop's patch grid needs sincos positions")
        if sincos_positions:  # (G*G, D), row-major: row r, column c is entry r*G + c
            table = sincos_2d_position_encoding(self.position_grid, self.position_grid, config.hidden_size)
            self.register_buffer("grid_positions", table, persistent=False)
        self.decoder = MAEDecoder(config.hidden_size, decoder_width, decoder_layers, decoder_heads, self.grid,
                                  config.patch_size**2 * config.num_channels)
        embeddings = encoder.embeddings
        if sincos_positions:
            with torch.no_grad():  # row 0 belongs to the class token, which is not used
                embeddings.position_embedding.weight.zero_()
                embeddings.position_embedding.weight[1:] = sincos_2d_position_encoding(*self.grid, config.hidden_size)
            embeddings.position_embedding.requires_grad_(False)
        # Parts of CLIP that this objective (and UniSTD) never use: frozen, so DDP finds no unused trainable weight.
        embeddings.class_embedding.requires_grad_(False)
        encoder.post_layernorm.requires_grad_(False)

    @staticmethod
    def normalize_pixels(images: torch.Tensor) -> torch.Tensor:
        """[0, 1] -> roughly zero mean, unit variance, the scale the patch embedding is initialised for."""
        return (images - 0.5) / 0.25

    def token_positions(self, offsets: torch.Tensor | None) -> torch.Tensor:
        """Position code of every patch: (N, D) without offsets (CLIP's table), else (B, N, D) where patch (i, j) of
        crop b gets the sin-cos code of grid cell (offsets[b, 0] + i, offsets[b, 1] + j)."""
        if offsets is None:
            return self.encoder.embeddings.position_embedding.weight[1 : self.num_patches + 1]
        side, G = self.grid[0], self.position_grid
        if offsets.min() < 0 or offsets.max() > G - side:
            raise ValueError(f"offsets must lie in [0, {G - side}] for a {side} x {side} grid in a {G} x {G} one")
        steps = torch.arange(side, device=offsets.device)
        rows = offsets[:, 0, None, None] + steps[None, :, None]  # (B, side, 1)
        cols = offsets[:, 1, None, None] + steps[None, None, :]  # (B, 1, side)
        return self.grid_positions[(rows * G + cols).flatten(1)]  # (B, N, D)

    def encode_visible(self, images: torch.Tensor, ids_keep: torch.Tensor, offsets: torch.Tensor | None = None) -> torch.Tensor:
        """images (B, 3, S, S) in [0, 1], ids_keep (B, K) -> encoder output of the visible patches (B, K, D)."""
        clip = self.encoder
        embeddings = clip.embeddings
        x = embeddings.patch_embedding(self.normalize_pixels(images).to(embeddings.patch_embedding.weight.dtype))
        x = x.flatten(2).transpose(1, 2)  # (B, N, D)
        x = x + self.token_positions(offsets).to(x.dtype)
        x = x.gather(1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # (B, K, D)
        x = clip.pre_layrnorm(x)
        return clip.encoder(inputs_embeds=x).last_hidden_state  # (B, K, D)

    def forward(self, images: torch.Tensor, ids_keep: torch.Tensor, mask: torch.Tensor, norm_pix_loss: bool = True,
                offsets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss on hidden patches and the predictions (B, N, p*p*3) in target space; `offsets` (B, 2) place each
        crop's patch grid in the larger position grid (see `token_positions`)."""
        predictions = self.decoder(self.encode_visible(images, ids_keep, offsets), ids_keep)
        targets = patch_targets(images.float(), self.patch_size, norm_pix_loss)
        return masked_patch_loss(predictions, targets, mask), predictions


def build_autoencoder(args: PretrainArguments) -> CLIPMaskedAutoencoder:
    """A fresh model: the same weights for the same seed (the never-trained reference is rebuilt this way)."""
    torch.manual_seed(args.seed)
    encoder = CLIPVisionModel(clip_config(args))
    return CLIPMaskedAutoencoder(encoder, args.decoder_width, args.decoder_layers, args.decoder_heads,
                                 sincos_positions=args.position_embedding == "sincos", position_grid=args.position_grid)


def random_offsets(batch_size: int, args: PretrainArguments, rng: np.random.Generator) -> torch.Tensor:
    """(B, 2) uniform grid offsets of each crop's patch grid in the position grid (zeros without a larger grid)."""
    side = args.image_size // args.patch_size
    return torch.from_numpy(rng.integers(0, max(side, args.position_grid) - side + 1, size=(batch_size, 2)))


# ---------------------------------------------------------------------------------------------------------------------
# Images: sources, held-out split, augmented crops


def _as_rgb_float(array: np.ndarray) -> torch.Tensor:
    """(H, W), (H, W, 3) or (H, W, 4) uint8/bool/float -> (3, H, W) float32 in [0, 1]."""
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.float32)
    elif np.issubdtype(array.dtype, np.integer):
        array = array.astype(np.float32) / float(np.iinfo(array.dtype).max)
    array = array.astype(np.float32)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected a grey or RGB(A) image, got an array of shape {array.shape}")
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    array = array[..., :3]
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))).clamp(0, 1)


def _pil_to_tensor(image: Any) -> torch.Tensor:
    return _as_rgb_float(np.asarray(image.convert("RGB")))


def bundled_images() -> dict[str, torch.Tensor]:
    """The natural images that ship inside scikit-image and scikit-learn, as (3, H, W) tensors in [0, 1]."""
    try:
        import skimage.data
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ValueError(
            "the bundled images need scikit-image: pip install 'unistd-hf[pretrain]' (or pass --bundled_images false "
            "with --image_folder/--hf_dataset)"
        ) from error
    from sklearn.datasets import load_sample_images

    images = {}
    for name in SKIMAGE_IMAGES:
        image = getattr(skimage.data, name)()
        images[name] = _as_rgb_float(image[0] if isinstance(image, tuple) else image)  # stereo: the left view
    samples = load_sample_images()
    for path, image in zip(samples.filenames, samples.images):
        images[Path(path).stem] = _as_rgb_float(image)
    return images


class ImagePool:
    """Images addressed by index, loaded on demand (so a folder of a million files costs a list of paths).

    Args:
        loaders: one callable per image returning (3, H, W) in [0, 1].
        names: one name per image (reports say which images were held out).
    """

    def __init__(self, loaders: Sequence[Callable[[], torch.Tensor]], names: Sequence[str]) -> None:
        self.loaders, self.names = list(loaders), list(names)

    def __len__(self) -> int:
        return len(self.loaders)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.loaders[index]()

    def subset(self, indices: Sequence[int]) -> "ImagePool":
        return ImagePool([self.loaders[i] for i in indices], [self.names[i] for i in indices])

    def __add__(self, other: "ImagePool") -> "ImagePool":
        return ImagePool(self.loaders + other.loaders, self.names + other.names)


def _folder_pool(folder: str) -> ImagePool:
    from PIL import Image

    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"--image_folder {folder!r} is not a folder")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise ValueError(f"--image_folder {folder!r} holds no image files ({', '.join(IMAGE_SUFFIXES)})")

    def loader(path: Path) -> Callable[[], torch.Tensor]:
        def load() -> torch.Tensor:
            with Image.open(path) as image:
                return _pil_to_tensor(image)
        return load

    return ImagePool([loader(p) for p in paths], [str(p.relative_to(root)) for p in paths])


def _hf_pool(name_or_path: str, split: str) -> ImagePool:
    import datasets

    try:
        if Path(name_or_path).is_dir():  # a `save_to_disk` folder (Dataset or DatasetDict)
            data = datasets.load_from_disk(name_or_path)
        else:
            data = datasets.load_dataset(name_or_path)
    except Exception as error:  # datasets raises many types for "not found"
        raise ValueError(f"--hf_dataset {name_or_path!r} could not be loaded offline: {error}") from error
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise ValueError(f"--hf_dataset {name_or_path!r} has no split {split!r}; splits: {list(data)}")
        data = data[split]
    columns = [c for c, feature in data.features.items() if isinstance(feature, datasets.Image)]
    if not columns:
        raise ValueError(f"--hf_dataset {name_or_path!r} has no Image column; features: {data.features}")
    column = columns[0]

    def loader(index: int) -> Callable[[], torch.Tensor]:
        return lambda: _pil_to_tensor(data[index][column])

    return ImagePool([loader(i) for i in range(len(data))], [f"{name_or_path}[{i}]" for i in range(len(data))])


def shrink(image: torch.Tensor, max_short_side: int) -> torch.Tensor:
    """Downscale (antialiased) so the shorter side is at most `max_short_side`: crops are resized to a few dozen
    pixels anyway, and resizing a 1400-pixel crop for every sample would cost more than the model step."""
    _, H, W = image.shape
    if min(H, W) <= max_short_side:
        return image
    scale = max_short_side / min(H, W)
    size = (max(1, round(H * scale)), max(1, round(W * scale)))
    return F.interpolate(image[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0].clamp(0, 1)


def image_pools(args: PretrainArguments) -> tuple[ImagePool, ImagePool]:
    """(train, held-out) images. Bundled: fixed held-out images; folder/dataset: a fixed random fraction."""
    train, heldout = ImagePool([], []), ImagePool([], [])
    limit = MAX_SHORT_SIDE_FACTOR * args.image_size
    if args.bundled_images:
        images = bundled_images()
        for name, image in images.items():
            pool = ImagePool([lambda image=shrink(image, limit): image], [name])
            if name in HELDOUT_BUNDLED:
                heldout = heldout + pool
            else:
                train = train + pool
    for extra in ([_folder_pool(args.image_folder)] if args.image_folder else []) + \
                 ([_hf_pool(args.hf_dataset, args.hf_split)] if args.hf_dataset else []):
        extra = ImagePool([lambda load=load: shrink(load(), limit) for load in extra.loaders], extra.names)
        order = np.random.default_rng(HELDOUT_SEED).permutation(len(extra))
        count = min(len(extra) - 1, max(1, math.ceil(args.heldout_fraction * len(extra)))) if len(extra) > 1 else 0
        heldout = heldout + extra.subset(sorted(order[:count].tolist()))
        train = train + extra.subset(sorted(order[count:].tolist()))
    if len(train) == 0:
        raise ValueError("no training images: keep --bundled_images or pass --image_folder / --hf_dataset")
    if len(heldout) == 0:
        raise ValueError("no held-out images: add images (a folder needs at least two) or keep --bundled_images")
    return train, heldout


def random_resized_crop(image: torch.Tensor, size: int, rng: np.random.Generator, min_scale: float) -> torch.Tensor:
    """A crop of area fraction U(min_scale, 1) and aspect ratio in [3/4, 4/3] (log-uniform), resized to size x size."""
    _, H, W = image.shape
    for _ in range(10):
        area = H * W * rng.uniform(min_scale, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < w <= W and 0 < h <= H:
            top, left = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
            break
    else:  # a central square crop, as torchvision falls back to
        h = w = min(H, W)
        top, left = (H - h) // 2, (W - w) // 2
    crop = image[:, top : top + h, left : left + w].unsqueeze(0)
    mode = dict(mode="bilinear", antialias=True, align_corners=False)
    return F.interpolate(crop, size=(size, size), **mode)[0].clamp(0, 1)


def grey(image: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma, repeated to 3 channels."""
    luma = 0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2]
    return luma.expand(3, -1, -1).clone()


def augment(crop: torch.Tensor, rng: np.random.Generator, args: PretrainArguments) -> torch.Tensor:
    """Horizontal flip, colour jitter (brightness, contrast, saturation), and a grey version with some probability."""
    if rng.random() < 0.5:
        crop = crop.flip(-1)
    j = args.color_jitter
    if j > 0:
        crop = crop * rng.uniform(1 - j, 1 + j)
        mean = crop.mean()
        crop = (crop - mean) * rng.uniform(1 - j, 1 + j) + mean
        luma = grey(crop)
        crop = luma + (crop - luma) * rng.uniform(1 - j, 1 + j)
    if rng.random() < args.grey_probability:
        crop = grey(crop)
    return crop.clamp(0, 1)


def sample_batch(pool: ImagePool, args: PretrainArguments, rng: np.random.Generator) -> torch.Tensor:
    """(batch_size, 3, S, S) augmented crops; fixed by the generator's state (a resumed run draws the same)."""
    crops = []
    for _ in range(args.batch_size):
        image = pool[int(rng.integers(0, len(pool)))]
        crops.append(augment(random_resized_crop(image, args.image_size, rng, args.min_crop_scale), rng, args))
    return torch.stack(crops)


def heldout_set(pool: ImagePool, args: PretrainArguments, num_patches: int) -> tuple[torch.Tensor, ...]:
    """Fixed held-out crops (no colour jitter), masks and grid offsets: (crops, ids_keep, mask, offsets), the same
    for every seed."""
    rng = np.random.default_rng(HELDOUT_SEED)
    images = [pool[i] for i in range(len(pool))] if len(pool) <= 64 else None
    crops = []
    for index in range(args.num_heldout_crops):
        i = index % len(pool)
        image = images[i] if images is not None else pool[i]
        crops.append(random_resized_crop(image, args.image_size, rng, args.min_crop_scale))
    ids_keep, mask = random_masking(len(crops), num_patches, args.mask_ratio, torch.Generator().manual_seed(HELDOUT_SEED))
    return torch.stack(crops), ids_keep, mask, random_offsets(len(crops), args, rng)


@torch.no_grad()
def heldout_loss(model: CLIPMaskedAutoencoder, heldout: tuple[torch.Tensor, ...], norm_pix_loss: bool,
                 device: torch.device, batch_size: int = 64) -> float:
    """Masked-patch loss over the fixed held-out crops (a mean over all their hidden patches)."""
    crops, ids_keep, mask, offsets = heldout
    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    for start in range(0, len(crops), batch_size):
        part = slice(start, start + batch_size)
        loss, _ = model(crops[part].to(device), ids_keep[part].to(device), mask[part].to(device), norm_pix_loss,
                        offsets[part].to(device))
        hidden = mask[part].sum().item()
        total, count = total + loss.item() * hidden, count + hidden
    model.train(was_training)
    return total / count


# ---------------------------------------------------------------------------------------------------------------------
# Checksums and the packaged backbone


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_checksums(folder: str | Path) -> dict[str, str]:
    """Write `SHA256SUMS` (the `sha256sum` format) for the checkpoint files of `folder`; returns {file: sha256}."""
    folder = Path(folder)
    sums = {name: sha256_of(folder / name) for name in CHECKSUMMED_FILES}
    (folder / CHECKSUM_FILE).write_text("".join(f"{digest}  {name}\n" for name, digest in sums.items()))
    return sums


def read_checksums(folder: str | Path) -> dict[str, str]:
    folder = Path(folder)
    sums = {}
    for line in (folder / CHECKSUM_FILE).read_text().splitlines():
        if line.strip():
            digest, _, name = line.strip().partition("  ")
            sums[name.lstrip("*")] = digest
    return sums


def verify_checksums(folder: str | Path) -> None:
    """Raise ValueError unless every file recorded in `folder/SHA256SUMS` (the weights at least) has its sha256."""
    folder = Path(folder)
    if not (folder / CHECKSUM_FILE).is_file():
        raise ValueError(f"backbone folder {str(folder)!r} has no {CHECKSUM_FILE}; cannot verify its weights")
    sums = read_checksums(folder)
    if "model.safetensors" not in sums:
        raise ValueError(f"{folder / CHECKSUM_FILE} records no sha256 for model.safetensors")
    for name, expected in sums.items():
        path = folder / name
        if not path.is_file():
            raise ValueError(f"backbone file {str(path)!r} is missing (recorded in {CHECKSUM_FILE})")
        found = sha256_of(path)
        if found != expected:
            raise ValueError(
                f"sha256 mismatch for {str(path)!r}: {CHECKSUM_FILE} records {expected}, the file has {found}; "
                "the backbone was changed after it was made (restore it, or re-create it with `make pretrain`)"
            )


def resolve_backbone(name_or_path: str | Path) -> str:
    """The folder or hub id to load for a `--backbone` value.

    `PACKAGED_BACKBONE` maps to the folder installed with this package; that folder, and any folder holding a
    `SHA256SUMS` file, is verified first (ValueError on a mismatch). Anything else (a hub id, a plain folder) is
    returned unchanged for `transformers` to load.
    """
    if str(name_or_path) == PACKAGED_BACKBONE:
        folder = PACKAGED_BACKBONE_DIR
        if not (folder / "model.safetensors").is_file():
            raise ValueError(
                f"the packaged backbone {PACKAGED_BACKBONE!r} is not installed at {str(folder)!r} (an install without "
                "package data?); reinstall unistd-hf or re-create it with `make pretrain`"
            )
        verify_checksums(folder)
        return str(folder)
    path = Path(name_or_path)
    if path.is_dir() and (path / CHECKSUM_FILE).is_file():
        verify_checksums(path)
    return str(name_or_path)


def load_backbone(name_or_path: str | Path = PACKAGED_BACKBONE) -> CLIPVisionModel:
    """`resolve_backbone`, then load through safetensors only (`modeling_unistd.load_clip_backbone`, no pickle)."""
    from .modeling_unistd import load_clip_backbone

    return load_clip_backbone(resolve_backbone(name_or_path))


# ---------------------------------------------------------------------------------------------------------------------
# Run folder, checkpoints


def validate_arguments(args: PretrainArguments) -> None:
    """Raise ValueError for arguments that cannot work, before any image is read or anything written."""
    positive = ("width", "layers", "heads", "mlp_ratio", "patch_size", "image_size", "decoder_width", "decoder_layers",
                "decoder_heads", "batch_size", "max_steps", "num_heldout_crops", "log_every", "keep_checkpoints")
    for name in positive:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.width % args.heads or args.decoder_width % args.decoder_heads:
        raise ValueError("--width must be divisible by --heads and --decoder_width by --decoder_heads")
    if args.image_size % args.patch_size:
        raise ValueError(f"--image_size {args.image_size} must be a multiple of --patch_size {args.patch_size}")
    if args.width % 4 or args.decoder_width % 4:
        raise ValueError("--width and --decoder_width must be divisible by 4 (2D sin-cos position code)")
    num_patches = (args.image_size // args.patch_size) ** 2
    if not 0.0 < args.mask_ratio < 1.0 or num_visible_patches(num_patches, args.mask_ratio) >= num_patches:
        raise ValueError(f"--mask_ratio must hide at least one of the {num_patches} patches and show one, got {args.mask_ratio}")
    if args.position_embedding not in ("sincos", "learned"):
        raise ValueError(f"--position_embedding must be 'sincos' or 'learned', got {args.position_embedding!r}")
    side = args.image_size // args.patch_size
    if args.position_grid < 0 or (args.position_grid > side and args.position_embedding != "sincos"):
        raise ValueError(f"--position_grid must be >= 0, and larger than the {side} x {side} patch grid only with "
                         f"--position_embedding sincos (got {args.position_grid}; 0 turns grid offsets off)")
    if args.mixed_precision not in ("no", "fp16", "bf16"):
        raise ValueError(f"--mixed_precision must be one of ('no', 'fp16', 'bf16'), got {args.mixed_precision!r}")
    if not 0.0 < args.min_crop_scale <= 1.0 or not 0.0 <= args.grey_probability <= 1.0 or not 0.0 <= args.color_jitter < 1.0:
        raise ValueError("--min_crop_scale must be in (0, 1], --grey_probability in [0, 1], --color_jitter in [0, 1)")
    if not 0.0 < args.heldout_fraction < 1.0:
        raise ValueError(f"--heldout_fraction must be in (0, 1), got {args.heldout_fraction}")
    if not args.bundled_images and not args.image_folder and not args.hf_dataset:
        raise ValueError("no images: keep --bundled_images or pass --image_folder / --hf_dataset")
    if args.resume_from_checkpoint not in (None, "latest") and not Path(args.resume_from_checkpoint).is_dir():
        raise ValueError(f"--resume_from_checkpoint {args.resume_from_checkpoint!r} is not a checkpoint folder")
    output = Path(args.output_dir)
    recorded = output / "run_args.json"
    if recorded.exists() and not args.overwrite_output_dir:
        before = json.loads(recorded.read_text())
        now = defining_arguments(args)
        diff = {k: (before.get(k), now.get(k)) for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)}
        if diff:
            raise ValueError(
                f"output_dir {str(output)!r} holds a different run ({{argument: (recorded, now)}} = {diff}); "
                "use another --output_dir or --overwrite_output_dir"
            )
    check_writable(output)


def defining_arguments(args: PretrainArguments) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(args).items() if k not in NON_DEFINING_ARGS and k != "output_dir"}


def save_checkpoint(accelerator: Any, args: PretrainArguments, state: dict[str, Any]) -> Path:
    write_main = lambda tmp: (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=1))  # noqa: E731
    return write_checkpoint(accelerator, args.output_dir, state["step"], args.keep_checkpoints, write_main)


def save_backbone_folder(encoder: CLIPVisionModel, target: Path) -> dict[str, str]:
    """`save_pretrained` (config.json + model.safetensors) and SHA256SUMS, written atomically; returns the sums."""
    clean = CLIPVisionModel._from_config(encoder.config)
    clean.load_state_dict(encoder.state_dict(), strict=True)
    sums: dict[str, str] = {}

    def write(tmp: str) -> None:
        clean.save_pretrained(tmp, safe_serialization=True)
        for name in CHECKSUMMED_FILES:  # safetensors writes 0600; a shipped file must be readable by all
            os.chmod(Path(tmp) / name, 0o644)
        sums.update(write_checksums(tmp))

    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(target, write)
    return sums


# ---------------------------------------------------------------------------------------------------------------------
# Report and figures


def plot_loss_curve(log: list[dict], heldout: list[dict], never_trained: float | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    axis.plot([r["step"] for r in log], [r["loss"] for r in log], label="training batches (window mean)")
    if heldout:
        axis.plot([r["step"] for r in heldout], [r["loss"] for r in heldout], "o-", label="held-out crops")
    if never_trained is not None:
        axis.axhline(never_trained, color="grey", linestyle="--", label=f"never-trained ({never_trained:.3f})")
    axis.set_xlabel("step")
    axis.set_ylabel("masked-patch MSE")
    axis.set_yscale("log")
    axis.set_title("MAE pretraining")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


@torch.no_grad()
def reconstruction_images(model: CLIPMaskedAutoencoder, crops: torch.Tensor, ids_keep: torch.Tensor, mask: torch.Tensor,
                          norm_pix_loss: bool, offsets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked input, reconstruction) as images: visible patches pasted from the crop, hidden ones predicted.

    With normalised-pixel targets a prediction is mapped back with the true patch's mean and std (MAE's visualisation).
    """
    model.eval()
    device = next(model.parameters()).device
    offsets = None if offsets is None else offsets.to(device)
    _, predictions = model(crops.to(device), ids_keep.to(device), mask.to(device), norm_pix_loss, offsets)
    predictions = predictions.float().cpu()
    pixels = patchify(crops, model.patch_size)  # (B, N, P)
    if norm_pix_loss:
        mean, var = pixels.mean(-1, keepdim=True), pixels.var(-1, keepdim=True)
        predictions = predictions * (var + NORM_PIX_EPS) ** 0.5 + mean
    hidden = mask.unsqueeze(-1)
    S = crops.shape[-1]
    masked = unpatchify(pixels * (1 - hidden) + 0.5 * hidden, model.patch_size, S, S)
    filled = unpatchify(pixels * (1 - hidden) + predictions * hidden, model.patch_size, S, S)
    return masked.clamp(0, 1), filled.clamp(0, 1)


def plot_reconstructions(rows: dict[str, torch.Tensor], path: Path, title: str) -> None:
    """One column per crop; rows such as held-out crop / masked input / pretrained / never-trained."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = next(iter(rows.values())).shape[0]
    figure, axes = plt.subplots(len(rows), columns, figsize=(1.5 * columns, 1.6 * len(rows)), squeeze=False)
    for r, (label, images) in enumerate(rows.items()):
        for c in range(columns):
            axis = axes[r][c]
            axis.imshow(images[c].permute(1, 2, 0).numpy(), vmin=0, vmax=1)
            axis.set_xticks([])
            axis.set_yticks([])
            if c == 0:
                axis.set_ylabel(label, fontsize=8)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def format_report_markdown(report: dict[str, Any]) -> str:
    h = report["heldout"]
    a = report["arguments"]
    lines = [
        "# MAE pretraining report",
        "",
        f"CLIP vision encoder: width {a['width']}, {a['layers']} layers, {a['heads']} heads, patch {a['patch_size']}, "
        f"image {a['image_size']}, {a['position_embedding']} positions (grid offsets within {a['position_grid']} x "
        f"{a['position_grid']}); {report['encoder_parameters']:,} parameters.",
        f"{report['steps']} steps of {a['batch_size']} crops on {report['processes']} process(es) in "
        f"{report['wall_time_s']:.0f} s; seed {a['seed']}; mask ratio {a['mask_ratio']}; "
        f"targets: {'per-patch normalised pixels' if a['norm_pix_loss'] else 'pixels'}.",
        f"Training images: {report['num_train_images']}; held-out images: {', '.join(report['heldout_images'][:10])}"
        + (" ..." if len(report["heldout_images"]) > 10 else "") + ".",
        "",
        f"## Masked-patch loss on {report['num_heldout_crops']} held-out crops (fixed crops and masks)",
        "",
        "| model | held-out loss |",
        "|---|---:|",
        f"| pretrained (this run) | {h['pretrained']:.4f} |",
        f"| never trained (same seed, step 0) | {h['never_trained']:.4f} |",
    ]
    if h.get("flat_patch") is not None:
        lines.append(f"| each hidden patch predicted flat at its own mean (no learning) | {h['flat_patch']:.4f} |")
    lines += [
        "",
        f"Last training-batch loss (mean of the last {a['log_every']} steps): {report['final_train_loss']:.4f}.",
        "",
        f"Backbone: `backbone/` (model.safetensors sha256 `{report['backbone_sha256']['model.safetensors']}`).",
        "",
        "![loss curve](loss_curve.png)",
        "",
        "![reconstructions](reconstructions.png)",
    ]
    return "\n".join(lines) + "\n"


def export_readme(report: dict[str, Any], command: str) -> str:
    h = report["heldout"]
    sums = report["backbone_sha256"]
    return "\n".join([
        "# clip-mae-tiny: the backbone shipped with unistd-hf",
        "",
        f"A transformers `CLIPVisionModel` (width {report['arguments']['width']}, {report['arguments']['layers']} layers, "
        f"{report['arguments']['heads']} heads, {report['encoder_parameters']:,} parameters) pretrained as a masked "
        "autoencoder on the natural images bundled with scikit-image and scikit-learn (no forecasting data). "
        f"Load it with `unistd_hf.pretrain.load_backbone({PACKAGED_BACKBONE!r})` or pass "
        f"`--backbone {PACKAGED_BACKBONE}`; the sha256 in `SHA256SUMS` is checked on every load. "
        "How it was made and what it learned: docs/PRETRAINING.md.",
        "",
        "| | |",
        "|---|---|",
        f"| command | `{command}` |",
        f"| seed | {report['arguments']['seed']} |",
        f"| steps x batch | {report['steps']} x {report['arguments']['batch_size']} |",
        f"| wall time | {report['wall_time_s']:.0f} s on {report['threads']} CPU thread(s) ({report['device']}) |",
        f"| final training loss | {report['final_train_loss']:.4f} |",
        f"| held-out loss: pretrained / never trained / flat patch | {h['pretrained']:.4f} / {h['never_trained']:.4f} / "
        f"{'-' if h.get('flat_patch') is None else format(h['flat_patch'], '.4f')} |",
        f"| torch / transformers | {report['versions']['torch']} / {report['versions']['transformers']} |",
        "",
        "sha256:",
        "",
        *[f"    {digest}  {name}" for name, digest in sums.items()],
        "",
    ])


# ---------------------------------------------------------------------------------------------------------------------
# The loop


def pretrain(args: PretrainArguments, command: str | None = None) -> dict[str, Any] | None:
    """Pretrain, then write the backbone, report and figures to `args.output_dir`; returns the report
    (None when `stop_after_step` stopped the run early, as a kill would)."""
    import transformers
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    validate_arguments(args)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    started = time.time()
    output = Path(args.output_dir)
    accelerator = Accelerator(cpu=args.cpu, mixed_precision=args.mixed_precision)
    train_pool, heldout_pool = image_pools(args)
    resume = latest_checkpoint(output) if args.resume_from_checkpoint == "latest" else args.resume_from_checkpoint
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        (output / "run_args.json").write_text(json.dumps(defining_arguments(args), indent=1))
        if not resume:  # a fresh start replaces what an earlier start of this run left
            shutil.rmtree(output / "checkpoints", ignore_errors=True)
            (output / "logs.jsonl").unlink(missing_ok=True)
    accelerator.wait_for_everyone()

    model = build_autoencoder(args)
    if not args.train_encoder:
        model.encoder.requires_grad_(False)
    set_seed(args.seed)
    heldout = heldout_set(heldout_pool, args, model.num_patches)
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]  # biases and norm weights (the (1, 1, D) mask token is decayed)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.learning_rate, betas=(0.9, 0.95))
    scheduler = get_cosine_schedule_with_warmup(optimizer, min(args.warmup_steps, args.max_steps), args.max_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    bare = accelerator.unwrap_model(model)

    state: dict[str, Any] = {"step": 0, "log": [], "heldout": []}
    if resume:
        accelerator.load_state(str(resume))
        state = json.loads((Path(resume) / "trainer_state.json").read_text())
        accelerator.print(f"resumed from {resume} at step {state['step']}")
    if not state["heldout"]:  # step 0: the never-trained model
        state["heldout"].append({"step": 0, "loss": heldout_loss(bare, heldout, args.norm_pix_loss, accelerator.device)})

    progress = tqdm(total=args.max_steps, initial=state["step"], disable=not accelerator.is_local_main_process,
                    desc="MAE pretraining", unit="step")
    model.train()
    window: list[float] = []
    num_patches = bare.num_patches
    while state["step"] < args.max_steps:
        step = state["step"] + 1
        # everything random in a step is fixed by (seed, step, process): a resumed run draws the same batches
        rng = np.random.default_rng([args.seed, step, accelerator.process_index])
        images = sample_batch(train_pool, args, rng).to(accelerator.device)
        generator = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
        ids_keep, mask = random_masking(args.batch_size, num_patches, args.mask_ratio, generator, accelerator.device)
        offsets = random_offsets(args.batch_size, args, rng).to(accelerator.device)
        with accelerator.autocast():
            loss, _ = model(images, ids_keep, mask, args.norm_pix_loss, offsets)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss ({loss.item()}) at step {step}; lower --learning_rate")
        accelerator.backward(loss)
        if args.max_grad_norm > 0:
            accelerator.clip_grad_norm_(trainable, args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] = step
        window.append(loss.item())
        progress.update(1)
        progress.set_postfix(loss=f"{loss.item():.4f}")
        if step % args.log_every == 0 or step == args.max_steps:
            record = {"step": step, "loss": float(np.mean(window)), "lr": scheduler.get_last_lr()[0]}
            window = []
            state["log"].append(record)
            if accelerator.is_main_process:
                with open(output / "logs.jsonl", "a") as handle:
                    handle.write(json.dumps(record) + "\n")
        if (args.eval_every and step % args.eval_every == 0) or step == args.max_steps:
            state["heldout"].append({"step": step, "loss": heldout_loss(bare, heldout, args.norm_pix_loss, accelerator.device)})
        if (args.checkpoint_every and step % args.checkpoint_every == 0) or step == args.max_steps:
            save_checkpoint(accelerator, args, state)
        if args.stop_after_step and step >= args.stop_after_step:
            progress.close()
            accelerator.end_training()
            return None
    progress.close()

    # reference: the never-trained model, rebuilt from the same seed; and the flat-patch predictor (norm_pix: zeros)
    never = build_autoencoder(args).to(accelerator.device)
    never_loss = heldout_loss(never, heldout, args.norm_pix_loss, accelerator.device)
    flat = None
    if args.norm_pix_loss:
        crops, _, hmask, _ = heldout
        targets = patch_targets(crops, bare.patch_size, True)
        flat = masked_patch_loss(torch.zeros_like(targets), targets, hmask).item()
    pretrained_loss = state["heldout"][-1]["loss"]
    report: dict[str, Any] = {
        "steps": state["step"],
        "wall_time_s": round(time.time() - started, 1),
        "processes": accelerator.num_processes,
        "threads": torch.get_num_threads(),
        "device": str(accelerator.device),
        "encoder_parameters": sum(p.numel() for p in bare.encoder.parameters()),
        "decoder_parameters": sum(p.numel() for p in bare.decoder.parameters()),
        "num_train_images": len(train_pool),
        "heldout_images": heldout_pool.names,
        "num_heldout_crops": args.num_heldout_crops,
        "final_train_loss": state["log"][-1]["loss"] if state["log"] else float("nan"),
        "heldout": {"pretrained": pretrained_loss, "never_trained": never_loss, "flat_patch": flat},
        "heldout_history": state["heldout"],
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "arguments": dataclasses.asdict(args),
        "command": command,
    }
    if accelerator.is_main_process:
        report["backbone_sha256"] = save_backbone_folder(bare.encoder, output / "backbone")
        plot_loss_curve(state["log"], state["heldout"], never_loss, output / "loss_curve.png")
        crops, ids_keep, hmask, offsets = (t[:8] for t in heldout)
        masked, filled = reconstruction_images(bare, crops, ids_keep, hmask, args.norm_pix_loss, offsets)
        _, random_filled = reconstruction_images(never, crops, ids_keep, hmask, args.norm_pix_loss, offsets)
        plot_reconstructions(
            {"held-out crop": crops, "masked input": masked, "pretrained": filled, "never trained": random_filled},
            output / "reconstructions.png",
            f"held-out crops, {int(args.mask_ratio * 100)}% of patches hidden; loss pretrained {pretrained_loss:.3f} "
            f"vs never trained {never_loss:.3f}",
        )
        (output / "report.json").write_text(json.dumps(report, indent=1))
        (output / "report.md").write_text(format_report_markdown(report))
        if args.export_dir:
            export = Path(args.export_dir)
            save_backbone_folder(bare.encoder, export)
            (export / "README.md").write_text(export_readme(report, command or "python -m unistd_hf.pretrain ..."))
            (export / "pretrain_report.json").write_text(json.dumps(
                {k: v for k, v in report.items() if k not in ("heldout_images",)}, indent=1))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return report


def parse_arguments(argv: list[str] | None = None) -> PretrainArguments:
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(PretrainArguments).parse_args_into_dataclasses(args=argv)
    return args


def main(argv: list[str] | None = None) -> int:
    """Parse, validate and pretrain; bad arguments print one `error:` line and return 2 before any work."""
    argv = sys.argv[1:] if argv is None else argv
    command = " ".join(["python -m unistd_hf.pretrain", *map(shlex.quote, argv)])
    try:
        pretrain(parse_arguments(argv), command=command)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except FloatingPointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Forecast with a saved UniSTD adapter.

    python -m unistd_hf.predict --adapter outputs/unistd/adapter --task moving_digits --input clip.npy

The input is a .npy array (T, C, H, W) or (B, T, C, H, W): float in [0, 1], or uint8 (divided by 255); other
value ranges are refused (map them to [0, 1] as the task's loader does). Writes the predictions (B, T', C, H, W)
float32, clamped to [0, 1] unless --no_clamp, to --output (default: <input>.pred.npy) and a picture of the first
clip.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

__all__ = ["predict", "main"]


def resolve_backbone(adapter_dir: Path, backbone: str | None) -> str | None:
    """--backbone if given; else the training run's saved random backbone next to the adapter, if present."""
    if backbone:
        return backbone
    sibling = adapter_dir.parent / "backbone"
    return str(sibling) if (sibling / "config.json").exists() else None


def read_input(path: Path) -> torch.Tensor:
    """Frames (B, T, C, H, W) float32 in [0, 1] from a .npy file; uint8 frames are divided by 255, floats are
    taken as they are (the model refuses values outside [0, 1])."""
    if not path.is_file():
        raise ValueError(f"input file {str(path)!r} does not exist")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise ValueError(f"input file {str(path)!r} is not a readable .npy array (empty or truncated?): {error}") from error
    if array.ndim == 4:
        array = array[None]
    if array.ndim != 5:
        raise ValueError(f"{path}: expected an array (T, C, H, W) or (B, T, C, H, W), got shape {array.shape}")
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    elif not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{path}: expected float values in [0, 1] or uint8, got dtype {array.dtype}")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


@torch.no_grad()
def predict(
    adapter: str | Path, task: str, inputs: torch.Tensor, backbone: str | None = None, clamp: bool = True
) -> torch.Tensor:
    """Forecast of a saved model; `clamp` limits the (linear) output to the data's [0, 1] range."""
    from .baselines import load_reference_model
    from .peft_integration import load_unistd_peft_model

    if (Path(adapter) / "config.json").is_file():  # a --method simvp/tau run saves a whole model (output_dir/model)
        model = load_reference_model(adapter).eval()
    else:
        model = load_unistd_peft_model(adapter, backbone=resolve_backbone(Path(adapter), backbone)).eval()
    predictions = model(pixel_values=inputs, task=task).predictions
    return predictions.clamp(0.0, 1.0) if clamp else predictions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True,
                        help="folder written by the training run (output_dir/adapter, or output_dir/model for simvp/tau)")
    parser.add_argument("--task", required=True, help="a task the model was trained on")
    parser.add_argument("--input", required=True, help=".npy array (T, C, H, W) or (B, T, C, H, W)")
    parser.add_argument("--output", default=None, help="where to write predictions (.npy)")
    parser.add_argument("--backbone", default=None, help="backbone folder or hub id, if not the one the run saved")
    parser.add_argument("--no_clamp", action="store_true", help="write the raw linear output, not clamped to [0, 1]")
    args = parser.parse_args(argv)
    from .cli import USER_ERRORS
    from .report import plot_prediction_grid

    try:
        inputs = read_input(Path(args.input))
        predictions = predict(args.adapter, args.task, inputs, args.backbone, clamp=not args.no_clamp)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    output = Path(args.output or Path(args.input).with_suffix(".pred.npy"))
    np.save(output, predictions.float().cpu().numpy())
    picture = plot_prediction_grid(inputs[0], None, predictions[0], output.with_suffix(".png"), args.task)
    print(f"predictions {tuple(predictions.shape)} -> {output}; picture -> {picture}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

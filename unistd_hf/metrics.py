"""Forecast metrics on clips in [0, 1], computed in torch on whole batches (no per-sample Python loops).

All functions take `pred` and `target` of shape (B, T, C, H, W) and return a 0-dim float64 tensor.

Conventions (and how they relate to OpenSTL's tables):

- `mse`, `mae`: mean over every pixel of every channel, frame and clip (the usual "per pixel" numbers).
- `mse_openstl`, `mae_openstl`: OpenSTL's convention, the error summed over C*H*W and averaged over
  batch and time (`np.mean(err, axis=(0, 1)).sum()`), i.e. `mse * C * H * W`.
- `rmse`: the square root of the per-pixel `mse` (OpenSTL reports `sqrt(mse_openstl)` instead).
- `psnr`: per frame (MSE over C*H*W), `10 * log10(data_range**2 / mse)`, then averaged over frames, as
  OpenSTL and `skimage.metrics.peak_signal_noise_ratio(data_range=1)` per frame. A frame with zero error
  would give +inf, so the per-frame MSE is floored at 1e-10 (PSNR capped at 100 dB) to keep means finite.
- `ssim`: per frame and channel, averaged over channels then frames, equal to
  `skimage.metrics.structural_similarity(..., channel_axis=-1, data_range=data_range)` with either
  `window="gaussian"` (`gaussian_weights=True, sigma=1.5, use_sample_covariance=False`, the setting of
  Wang et al. 2004; default) or `window="uniform"` (scikit-image's default 7x7 mean filter with the sample
  covariance). OpenSTL calls scikit-image with its defaults on float frames in [0, 1] and no `data_range`;
  the scikit-image versions it was published with then took the float dtype range (-1, 1), so its tables
  correspond to `ssim(pred, target, window="uniform", data_range=2.0)` (predictions clipped to [0, 1]).
- `ssim_openstl`: exactly that setting, reported beside `ssim` so our numbers sit next to published tables.
- `nino34_index`, `nino34_scores`: the three-month moving-averaged Nino3.4 index of ENSO SST frames and its skill
  (correlation per lead, weighted correlation, MSE), as Earthformer evaluates ICAR-ENSO.
- `csi(pred, target, threshold)`: critical success index, hits / (hits + misses + false alarms), where an
  event is a value >= threshold (as OpenSTL's SEVIR code). Counts are pooled over the whole set (all clips,
  frames, pixels), and 1e-6 is added to numerator and denominator like OpenSTL, so a set without any
  event scores 1.

`MetricAccumulator` sums these over an epoch and across processes; its keys are the names above, with CSI
reported as `"csi@<threshold>"` (e.g. `"csi@0.29"`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

__all__ = [
    "EVALUATE_MODULE_PATH",
    "METRIC_NAMES",
    "DEFAULT_METRICS",
    "MetricAccumulator",
    "copy_last_frame_baseline",
    "csi",
    "csi_counts",
    "csi_name",
    "mae",
    "mae_openstl",
    "mse",
    "mse_openstl",
    "NINO34_REGION",
    "nino34_index",
    "nino34_scores",
    "psnr",
    "psnr_per_frame",
    "rmse",
    "ssim",
    "ssim_openstl",
    "ssim_per_frame",
]

EVALUATE_MODULE_PATH = str(Path(__file__).parent / "metrics_module")  # for `evaluate.load(EVALUATE_MODULE_PATH)`
METRIC_NAMES = ("mse", "mae", "rmse", "psnr", "ssim", "ssim_openstl", "mse_openstl", "mae_openstl", "csi")
DEFAULT_METRICS = ("mse", "mae", "rmse", "psnr", "ssim", "ssim_openstl", "mse_openstl", "mae_openstl")
SSIMWindow = Literal["gaussian", "uniform"]

_PSNR_MSE_FLOOR = 1e-10
_CSI_EPS = 1e-6
_SSIM_K1, _SSIM_K2 = 0.01, 0.03


def _check_pair(pred: torch.Tensor, target: torch.Tensor, data_range: float | None = None) -> float:
    """Check a (pred, target) pair; returns the data range to use (1.0 for float frames in [0, 1])."""
    if not isinstance(pred, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise ValueError(
            f"pred and target must be torch tensors, got {type(pred).__name__} and {type(target).__name__}"
        )
    if pred.ndim != 5 or pred.shape != target.shape:
        raise ValueError(
            f"pred and target must both have shape (B, T, C, H, W), got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    if pred.numel() == 0:
        raise ValueError(f"pred and target hold no frames (shape {tuple(pred.shape)}); metrics need at least one")
    if data_range is None:
        if not (pred.is_floating_point() and target.is_floating_point()):
            raise ValueError(
                f"metrics expect float frames in [0, 1], got {pred.dtype} and {target.dtype}: convert integer frames "
                "(e.g. uint8 / 255.0), or pass data_range= (e.g. 255) where the metric takes one"
            )
        return 1.0
    if not data_range > 0:
        raise ValueError(f"data_range must be > 0 (the span of the values: 1.0 for [0, 1], 255 for uint8), got {data_range}")
    return float(data_range)


def _error(pred: torch.Tensor, target: torch.Tensor, data_range: float | None = None) -> torch.Tensor:
    _check_pair(pred, target, data_range)
    return pred.double() - target.double()  # (B, T, C, H, W)


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per pixel."""
    return _error(pred, target).square().mean()


def mae(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error per pixel."""
    return _error(pred, target).abs().mean()


def rmse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Square root of the per-pixel MSE."""
    return mse(pred, target).sqrt()


def mse_openstl(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """OpenSTL's MSE: squared error summed over C*H*W, averaged over batch and time."""
    return _error(pred, target).square().sum(dim=(2, 3, 4)).mean()


def mae_openstl(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """OpenSTL's MAE: absolute error summed over C*H*W, averaged over batch and time."""
    return _error(pred, target).abs().sum(dim=(2, 3, 4)).mean()


def psnr_per_frame(pred: torch.Tensor, target: torch.Tensor, data_range: float | None = None) -> torch.Tensor:
    """PSNR of each frame (MSE over C*H*W), shape (B, T); per-frame MSE floored at 1e-10. `data_range` None: float
    frames in [0, 1] (range 1); integer frames need it given."""
    data_range = _check_pair(pred, target, data_range)
    frame_mse = _error(pred, target, data_range).square().mean(dim=(2, 3, 4)).clamp_min(_PSNR_MSE_FLOOR)  # (B, T)
    return 10.0 * torch.log10(data_range**2 / frame_mse)


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float | None = None) -> torch.Tensor:
    """PSNR per frame, averaged over frames and clips."""
    return psnr_per_frame(pred, target, data_range).mean()


def _ssim_kernel_1d(window: SSIMWindow, device: torch.device) -> torch.Tensor:
    """The separable window scikit-image uses: Gaussian sigma 1.5 truncated at 3.5 sigma (11 taps), or 7-tap mean."""
    if window == "gaussian":
        sigma = 1.5
        radius = int(3.5 * sigma + 0.5)
        x = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
        kernel = torch.exp(-0.5 * (x / sigma) ** 2)
        return kernel / kernel.sum()
    if window == "uniform":
        return torch.full((7,), 1.0 / 7.0, dtype=torch.float64, device=device)
    raise ValueError(f"window must be 'gaussian' or 'uniform', got {window!r}")


def ssim_per_frame(
    pred: torch.Tensor, target: torch.Tensor, window: SSIMWindow = "gaussian", data_range: float | None = None
) -> torch.Tensor:
    """SSIM of each frame (mean over channels of the per-channel SSIM), shape (B, T).

    Only the "valid" part of the SSIM map is averaged, exactly what scikit-image keeps after cropping
    the border of width (window - 1) / 2, so no padding mode is involved.
    """
    data_range = _check_pair(pred, target, data_range)
    B, T, C, H, W = pred.shape
    kernel = _ssim_kernel_1d(window, pred.device)
    size = kernel.numel()
    if H < size or W < size:
        raise ValueError(f"SSIM with the {window} window needs frames of at least {size}x{size}, got {H}x{W}")
    x = pred.detach().double().reshape(B * T * C, 1, H, W)
    y = target.detach().double().reshape(B * T * C, 1, H, W)
    stack = torch.cat([x, y, x * x, y * y, x * y], dim=1).reshape(-1, 1, H, W)  # (N*5, 1, H, W)
    filtered = F.conv2d(stack, kernel.view(1, 1, size, 1))  # (N*5, 1, H-size+1, W)
    filtered = F.conv2d(filtered, kernel.view(1, 1, 1, size))  # (N*5, 1, H', W')
    ux, uy, uxx, uyy, uxy = filtered.reshape(B * T * C, 5, H - size + 1, W - size + 1).unbind(dim=1)
    cov_norm = 1.0 if window == "gaussian" else size * size / (size * size - 1.0)
    vx = cov_norm * (uxx - ux * ux)
    vy = cov_norm * (uyy - uy * uy)
    vxy = cov_norm * (uxy - ux * uy)
    c1 = (_SSIM_K1 * data_range) ** 2
    c2 = (_SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))  # (N, H', W')
    return ssim_map.mean(dim=(1, 2)).reshape(B, T, C).mean(dim=2)


def ssim(
    pred: torch.Tensor, target: torch.Tensor, window: SSIMWindow = "gaussian", data_range: float | None = None
) -> torch.Tensor:
    """SSIM per frame and channel, averaged over channels, frames and clips."""
    return ssim_per_frame(pred, target, window, data_range).mean()


def ssim_openstl(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SSIM as OpenSTL's tables report it: scikit-image's uniform 7x7 window with data range 2 (see module doc).

    Pass predictions clipped to [0, 1] to match those tables (`MetricAccumulator` does).
    """
    return ssim(pred, target, window="uniform", data_range=2.0)


def csi_counts(pred: torch.Tensor, target: torch.Tensor, threshold: float) -> torch.Tensor:
    """(hits, misses, false_alarms) of the event `value >= threshold`, pooled over everything, float64 (3,)."""
    _check_pair(pred, target)
    p = pred >= threshold
    t = target >= threshold
    hits = (p & t).sum()
    misses = (~p & t).sum()
    false_alarms = (p & ~t).sum()
    return torch.stack([hits, misses, false_alarms]).double()


def _csi_from_counts(counts: torch.Tensor) -> torch.Tensor:
    hits, misses, false_alarms = counts.unbind(-1)
    return (hits + _CSI_EPS) / (hits + misses + false_alarms + _CSI_EPS)


def csi(pred: torch.Tensor, target: torch.Tensor, threshold: float) -> torch.Tensor:
    """Critical success index hits / (hits + misses + false alarms) at `threshold` (1e-6 added like OpenSTL)."""
    return _csi_from_counts(csi_counts(pred, target, threshold))


def csi_name(threshold: float) -> str:
    """The output key of CSI at `threshold`, e.g. "csi@0.29"."""
    return f"csi@{threshold:g}"


def copy_last_frame_baseline(inputs: torch.Tensor, out_frames: int) -> torch.Tensor:
    """The persistence forecast: the last observed frame repeated, (B, T, C, H, W) -> (B, out_frames, C, H, W)."""
    if inputs.ndim != 5:
        raise ValueError(f"inputs must have shape (B, T, C, H, W), got {tuple(inputs.shape)}")
    if out_frames < 1:
        raise ValueError(f"out_frames must be >= 1, got {out_frames}")
    return inputs[:, -1:].expand(-1, out_frames, -1, -1, -1)


# Nino3.4 on the ICAR-ENSO grid Earthformer uses (24 x 48: latitudes 55S-60N, longitudes 95E-330E, 5 degrees):
# rows 10-12 = 5S-5N, columns 19-29 = 170W-120W.
NINO34_REGION = (slice(10, 13), slice(19, 30))
_NINO34_WEIGHTS = (1.5,) * 4 + (2.0,) * 7 + (3.0,) * 7  # per lead, then 4.0 (the ICAR-ENSO challenge's score)


def nino34_index(frames: torch.Tensor, value_range: tuple[float, float], window: int = 3) -> torch.Tensor:
    """The Nino3.4 index of SST frames (B, T, 1, 24, 48) in [0, 1]: (B, T - window + 1) in degrees C.

    Frames are mapped back to SST anomalies with `value_range` (the loader's (min, max), e.g.
    `get_task("enso").spec.value_range`), averaged over `NINO34_REGION`, then over `window` consecutive months.
    """
    if frames.ndim != 5 or frames.shape[2] != 1 or frames.shape[3] < 13 or frames.shape[4] < 30:
        raise ValueError(f"nino34_index expects SST frames (B, T, 1, 24, 48), got {tuple(frames.shape)}")
    if not 1 <= window <= frames.shape[1]:
        raise ValueError(f"window must be in [1, {frames.shape[1]}] (the frames), got {window}")
    low, high = value_range
    sst = frames.double()[:, :, 0] * (high - low) + low  # (B, T, H, W)
    index = sst[:, :, NINO34_REGION[0], NINO34_REGION[1]].mean(dim=(2, 3))  # (B, T)
    return index.unfold(1, window, 1).mean(dim=2)  # (B, T - window + 1)


def nino34_scores(
    pred: torch.Tensor, target: torch.Tensor, value_range: tuple[float, float], window: int = 3
) -> dict[str, float]:
    """Nino3.4 skill over a set of forecasts (B, T, 1, 24, 48), as Earthformer reports it for ICAR-ENSO.

    Returns `nino34_corr` (the Pearson correlation over the B forecasts of each lead, averaged over leads:
    "C-Nino3.4-M"), `nino34_wcorr` (weighted by the challenge's 1.5/2/3/4 * log(lead + 1), summed: "C-Nino3.4-WM")
    and `nino34_mse` (mean squared error of the index).
    """
    _check_pair(pred, target)
    p, t = nino34_index(pred, value_range, window), nino34_index(target, value_range, window)  # (B, L)
    p0, t0 = p - p.mean(dim=0), t - t.mean(dim=0)
    corr = (p0 * t0).sum(dim=0) / ((p0.square().sum(dim=0) * t0.square().sum(dim=0)).sqrt() + 1e-6)  # (L,)
    leads = corr.numel()
    weights = [(_NINO34_WEIGHTS[i] if i < len(_NINO34_WEIGHTS) else 4.0) * math.log(i + 1) for i in range(leads)]
    weights = torch.tensor(weights, dtype=torch.float64, device=corr.device)  # (L,)
    return {
        "nino34_corr": corr.mean().item(),
        "nino34_wcorr": (weights * corr).sum().item(),
        "nino34_mse": (p - t).square().mean().item(),
    }


# Layout of the accumulator's state tensor: these sums, then (hits, misses, false_alarms) per CSI threshold.
_N_PIXELS, _N_FRAMES, _SSE, _SAE, _SUM_PSNR, _SUM_SSIM, _SUM_SSIM_OPENSTL = range(7)
_N_SCALARS = 7


class MetricAccumulator:
    """Sums of errors over many batches (and processes), turned into metrics by `compute()`.

    The whole state is one float64 tensor (`state_tensor()`), so combining processes is one all-reduce:
    `acc.compute(reduce_fn=lambda t: accelerator.reduce(t, "sum"))`. All metrics are exact over the
    concatenation of the batches (per-pixel means, per-frame means, pooled CSI counts). Note that a
    distributed sampler that pads the last batch with repeated clips makes those clips count twice.

    Args:
        metrics: names among `METRIC_NAMES`; "csi" requires `csi_thresholds`.
        csi_thresholds: thresholds reported as "csi@<thr>"; given without "csi" in `metrics`, CSI is added.
        ssim_window: "gaussian" (Wang et al.) or "uniform" (scikit-image's default, OpenSTL); see module doc.
        data_range: the data range used by PSNR and SSIM.
        clip_predictions: clamp predictions to [0, 1] before PSNR and SSIM, as OpenSTL does (not for MSE/MAE/CSI).
        device: where the state lives; default: the device of the first batch.
    """

    def __init__(
        self,
        metrics: Sequence[str] = DEFAULT_METRICS,
        csi_thresholds: Sequence[float] = (),
        ssim_window: SSIMWindow = "gaussian",
        data_range: float = 1.0,
        clip_predictions: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        metrics = tuple(metrics)
        unknown = [m for m in metrics if m not in METRIC_NAMES]
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; expected names among {METRIC_NAMES}")
        self.csi_thresholds = tuple(float(t) for t in csi_thresholds)
        if "csi" in metrics and not self.csi_thresholds:
            raise ValueError("metric 'csi' needs csi_thresholds, e.g. csi_thresholds=(0.29, 0.52)")
        if self.csi_thresholds and "csi" not in metrics:
            metrics = metrics + ("csi",)
        _ssim_kernel_1d(ssim_window, torch.device("cpu"))  # validates the window name early
        self.metrics = metrics
        self.ssim_window: SSIMWindow = ssim_window
        self.data_range = float(data_range)
        self.clip_predictions = clip_predictions
        self._device = torch.device(device) if device is not None else None
        self._state: torch.Tensor | None = None

    @property
    def state_size(self) -> int:
        return _N_SCALARS + 3 * len(self.csi_thresholds)

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        self._state = None

    def state_tensor(self) -> torch.Tensor:
        """The float64 vector of sums; summing it over processes gives the global state."""
        if self._state is None:
            return torch.zeros(self.state_size, dtype=torch.float64, device=self._device)
        return self._state

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch (B, T, C, H, W) of predictions and targets."""
        _check_pair(pred, target)
        B, T, C, H, W = pred.shape
        if self._state is None:
            self._state = torch.zeros(self.state_size, dtype=torch.float64, device=self._device or pred.device)
        device = self._state.device
        pred, target = pred.detach().to(device), target.detach().to(device)
        err = pred.double() - target.double()  # (B, T, C, H, W)
        update = torch.zeros_like(self._state)
        update[_N_PIXELS] = err.numel()
        update[_N_FRAMES] = B * T
        update[_SSE] = err.square().sum()
        update[_SAE] = err.abs().sum()
        clipped = pred.clamp(0.0, 1.0) if self.clip_predictions else pred
        if "psnr" in self.metrics:
            update[_SUM_PSNR] = psnr_per_frame(clipped, target, self.data_range).sum()
        if "ssim" in self.metrics:
            update[_SUM_SSIM] = ssim_per_frame(clipped, target, self.ssim_window, self.data_range).sum()
        if "ssim_openstl" in self.metrics:  # fixed setting, independent of ssim_window and data_range
            update[_SUM_SSIM_OPENSTL] = ssim_per_frame(clipped, target, "uniform", 2.0).sum()
        for i, threshold in enumerate(self.csi_thresholds):
            start = _N_SCALARS + 3 * i
            update[start : start + 3] = csi_counts(pred, target, threshold)
        self._state += update

    def compute(self, reduce_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
        """Metrics over everything seen; `reduce_fn` (e.g. a cross-process sum) is applied to the state first."""
        state = self.state_tensor()
        if reduce_fn is not None:
            state = reduce_fn(state.clone())
        state = state.detach().double().cpu()
        if state.shape != (self.state_size,):
            raise ValueError(f"reduce_fn must return a tensor of shape ({self.state_size},), got {tuple(state.shape)}")
        n_pixels, n_frames = state[_N_PIXELS].item(), state[_N_FRAMES].item()
        if n_frames == 0:
            raise ValueError("MetricAccumulator.compute() called before any update()")
        values = {
            "mse": state[_SSE].item() / n_pixels,
            "mae": state[_SAE].item() / n_pixels,
            "rmse": math.sqrt(state[_SSE].item() / n_pixels),
            "psnr": state[_SUM_PSNR].item() / n_frames,
            "ssim": state[_SUM_SSIM].item() / n_frames,
            "ssim_openstl": state[_SUM_SSIM_OPENSTL].item() / n_frames,
            "mse_openstl": state[_SSE].item() / n_frames,
            "mae_openstl": state[_SAE].item() / n_frames,
        }
        out = {name: values[name] for name in self.metrics if name != "csi"}
        for i, threshold in enumerate(self.csi_thresholds):
            counts = state[_N_SCALARS + 3 * i : _N_SCALARS + 3 * i + 3]
            out[csi_name(threshold)] = _csi_from_counts(counts).item()
        return out

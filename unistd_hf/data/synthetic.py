"""Synthetic tasks, one per discipline, generated locally and deterministically from a seed.

Each simulator returns whole clips (N, T + T', C, H, W) as float32 in [0, 1], vectorised over the clips of
a chunk; the loaders cut them into `inputs`/`targets` and let `datasets` store and cache them.

- "moving_digits" (trajectory, 10->10, 1x64x64): two digits bouncing in a 64x64 box with the dynamics of
  OpenSTL's Moving MNIST generator (position in [0, 1]^2, step 0.1 along a random direction, reflected at
  the walls, pasted with `max`). Digits come from scikit-learn's bundled `load_digits` (8x8, upscaled to 28x28)
  or from an MNIST idx file (`mnist_path=`).
- "city_traffic" (traffic, 4->4, 2x32x32): inflow/outflow of a 32x32 city grid every 30 minutes: a fixed city
  (roads, residential areas, business hot spots, leisure areas) with daily commuting peaks, a weekly
  weekday/weekend pattern, random events (crowds arriving then leaving) and Poisson counting noise.
- "rain_nowcast" (weather, 13->12, 1x64x64): rain advected by a slowly turning, divergence-free wind with a
  semi-Lagrangian scheme; convective cells grow and decay (source terms moving with the wind, a fast decay)
  over slowly decaying stratiform rain; the value is `tanh(rain rate)`, a VIL-like level in [0, 1].
- "robot_shapes" (driving/robot, 2->10, 3x64x64): coloured polygons and discs moving, rotating and bouncing on
  a textured table, a robot arm passing over them (occlusion), the whole view drifting (camera motion).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..configuration_unistd import TaskSpec
from ..metrics import DEFAULT_METRICS
from .builder import Example, build_splits, file_signature, split_rng
from .registry import TaskInfo, register_task

__all__ = [
    "RAIN_CSI_THRESHOLDS",
    "load_city_traffic",
    "load_moving_digits",
    "load_rain_nowcast",
    "load_robot_shapes",
    "read_idx_images",
    "render_moving_digits",
    "simulate_city_traffic",
    "simulate_rain_nowcast",
    "simulate_robot_shapes",
]

VERSION = "1"  # bump when a simulator changes, so cached clips are rebuilt
CHUNK = 50  # clips simulated at once
PROGRESS_MIN_CLIPS = 500  # show a progress bar from this many clips on
RAIN_CSI_THRESHOLDS = (0.063, 0.29, 0.522, 0.627, 0.71, 0.859)  # SEVIR VIL levels 16, 74, 133, 160, 181, 219 / 255
DIGIT_SIZE = 28
DIGIT_TEST_FRACTION = 0.2  # the last 20% of the digit images are only used in the test split


# ---------------------------------------------------------------------------------------------------------
# moving digits


def read_idx_images(path: str | Path) -> np.ndarray:
    """Read an MNIST idx3 image file (optionally .gz): (N, rows, cols) uint8. Checks the magic number 2051."""
    import gzip

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MNIST images: expected an idx file (e.g. train-images-idx3-ubyte[.gz]) at {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 16 or int.from_bytes(raw[:4], "big") != 2051:
        magic = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
        raise ValueError(
            f"{path}: expected an MNIST idx3 image file (magic number 2051, uint8 images), got magic {magic}"
        )
    n, rows, cols = (int.from_bytes(raw[i : i + 4], "big") for i in (4, 8, 12))
    if len(raw) != 16 + n * rows * cols:
        raise ValueError(
            f"{path}: header says {n} images of {rows}x{cols} ({16 + n * rows * cols} bytes), file has {len(raw)}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, rows, cols)


def _sklearn_digits() -> np.ndarray:
    """scikit-learn's 1,797 8x8 digits upscaled to 28x28 strokes in [0, 1] (M, 28, 28) float32."""
    from sklearn.datasets import load_digits

    small = torch.from_numpy(load_digits().images.astype(np.float32) / 16.0)[:, None]  # (M, 1, 8, 8)
    big = F.interpolate(F.pad(small, (1, 1, 1, 1)), size=(DIGIT_SIZE, DIGIT_SIZE), mode="bicubic", align_corners=False)
    big = ((big - 0.25) * 1.6).clamp(0.0, 1.0)  # sharper strokes on a black background, like MNIST
    return big[:, 0].numpy()


def mnist_file(path: str | Path) -> Path:
    """The idx image file itself, or the one inside a folder (`train-images-idx3-ubyte[.gz]`)."""
    path = Path(path)
    if path.is_dir():
        candidates = [path / "train-images-idx3-ubyte.gz", path / "train-images-idx3-ubyte"]
        found = [p for p in candidates if p.is_file()]
        if not found:
            raise FileNotFoundError(f"MNIST images: expected {candidates[0]} or {candidates[1]}, found neither")
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"MNIST images: expected an idx file (e.g. train-images-idx3-ubyte[.gz]) at {path}")
    return path.resolve()


def _digit_pool(mnist_file: str | None, split: str) -> np.ndarray:
    """Digit images (M, 28, 28) in [0, 1]; the test split draws from a disjoint part of the images."""
    if mnist_file is None:
        digits = _sklearn_digits()
    else:
        digits = read_idx_images(mnist_file).astype(np.float32) / 255.0
        if digits.shape[1:] != (DIGIT_SIZE, DIGIT_SIZE):
            raise ValueError(f"{mnist_file}: expected 28x28 MNIST digits, got {digits.shape[1]}x{digits.shape[2]}")
    cut = int(round(len(digits) * (1.0 - DIGIT_TEST_FRACTION)))
    return digits[cut:] if split == "test" else digits[:cut]


def render_moving_digits(
    rng: np.random.Generator,
    digits: np.ndarray,
    num_clips: int,
    num_frames: int = 20,
    num_digits: int = 2,
    size: int = 64,
) -> np.ndarray:
    """Bouncing digits (N, T, 1, size, size) float32 in [0, 1], with the dynamics of Moving MNIST.

    `digits` (M, 28, 28) in [0, 1]. Each digit starts at a uniform position, moves 0.1 of the free range per
    frame along a uniform direction and is reflected at the walls; overlapping digits are combined by max.
    """
    free = size - DIGIT_SIZE
    position = rng.random((num_clips, num_digits, 2))  # (N, K, [y, x]) in [0, 1]
    theta = rng.random((num_clips, num_digits)) * 2 * np.pi
    step = 0.1 * np.stack([np.sin(theta), np.cos(theta)], axis=-1)  # (N, K, 2)
    sign = np.ones_like(step)
    corners = np.empty((num_clips, num_digits, num_frames, 2), dtype=np.int64)
    for t in range(num_frames):
        position = position + sign * step
        hit = (position <= 0.0) | (position >= 1.0)
        position = np.clip(position, 0.0, 1.0)
        sign = np.where(hit, -sign, sign)
        corners[:, :, t] = (free * position).astype(np.int64)
    chosen = rng.integers(0, len(digits), size=(num_clips, num_digits))
    frames = np.zeros((num_clips, num_frames, size, size), dtype=np.float32)
    offsets = np.arange(DIGIT_SIZE)
    clip_idx = np.arange(num_clips)[:, None, None, None]
    time_idx = np.arange(num_frames)[None, :, None, None]
    for k in range(num_digits):
        rows = corners[:, k, :, 0, None, None] + offsets[:, None]  # (N, T, 28, 1)
        cols = corners[:, k, :, 1, None, None] + offsets[None, :]  # (N, T, 1, 28)
        patch = digits[chosen[:, k]][:, None]  # (N, 1, 28, 28)
        frames[clip_idx, time_idx, rows, cols] = np.maximum(frames[clip_idx, time_idx, rows, cols], patch)
    return frames[:, :, None]


# ---------------------------------------------------------------------------------------------------------
# city traffic

_SLOTS_PER_DAY = 48  # 30-minute intervals, as TaxiBJ


def _blur(field: np.ndarray) -> np.ndarray:
    """A [1, 2, 1] / 4 blur along both axes (edges repeated)."""
    padded = np.pad(field, 1, mode="edge")
    field = 0.25 * padded[:-2, 1:-1] + 0.5 * padded[1:-1, 1:-1] + 0.25 * padded[2:, 1:-1]
    padded = np.pad(field, 1, mode="edge")
    return 0.25 * padded[1:-1, :-2] + 0.5 * padded[1:-1, 1:-1] + 0.25 * padded[1:-1, 2:]


def _city_maps(rng: np.random.Generator, size: int) -> np.ndarray:
    """Roads, residential, business and leisure intensity maps of one city: (4, size, size), max 1 each."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)

    def blobs(count: int, sigma: tuple[float, float]) -> np.ndarray:
        out = np.zeros((size, size), dtype=np.float32)
        for _ in range(count):
            cy, cx = rng.uniform(2, size - 2, 2)
            s = rng.uniform(*sigma)
            out += rng.uniform(0.5, 1.0) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
        return out / out.max()

    roads = np.zeros((size, size), dtype=np.float32)
    roads[rng.choice(size, size // 8, replace=False), :] = 1.0
    roads[:, rng.choice(size, size // 8, replace=False)] = 1.0
    roads = _blur(roads)
    return np.stack([roads / roads.max(), blobs(6, (3.0, 6.0)), blobs(3, (1.2, 2.5)), blobs(2, (1.5, 3.0))])


def simulate_city_traffic(
    rng: np.random.Generator, num_clips: int, city: np.ndarray, num_frames: int = 8, counts_scale: float = 150.0
) -> np.ndarray:
    """Crowd flows (N, T, 2, H, W) float32 in [0, 1]: channel 0 inflow, channel 1 outflow, one frame per 30 min.

    `city` (4, H, W) from `_city_maps`; each clip starts at a random slot of a random day of the week.
    """
    roads, residential, business, leisure = (m[None, None] for m in city)  # (1, 1, H, W) each
    size = city.shape[-1]
    start = rng.integers(0, 7 * _SLOTS_PER_DAY, size=num_clips)
    slot = start[:, None] + np.arange(num_frames)[None]  # (N, T)
    hour = ((slot % _SLOTS_PER_DAY) / 2.0)[:, :, None, None]  # (N, T, 1, 1)
    weekend = (((slot // _SLOTS_PER_DAY) % 7) >= 5)[:, :, None, None].astype(np.float32)
    workday = 1.0 - weekend

    def bump(centre: float, width: float) -> np.ndarray:
        return np.exp(-((hour - centre) ** 2) / (2 * width * width))

    sigmoid = lambda z: 1.0 / (1.0 + np.exp(-z))  # noqa: E731
    activity = 0.2 + 0.8 * sigmoid((hour - 6.5) / 0.8) * sigmoid((23.5 - hour) / 1.0)
    base = activity * (0.35 * roads + 0.15 * (residential + business))
    morning, evening = bump(8.5, 1.0), bump(18.0, 1.3)
    inflow = (
        base
        + workday * (0.9 * morning * business + 0.6 * evening * residential)
        + weekend * 0.6 * bump(14.0, 3.0) * leisure
    )
    outflow = (
        base
        + workday * (0.9 * morning * residential + 0.6 * evening * business)
        + weekend * 0.6 * bump(16.0, 3.0) * leisure
    )

    # random events: a crowd gathers around a point, then leaves (at most 3 per clip)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    frames = np.arange(num_frames, dtype=np.float32)[None, :, None, None]
    for _ in range(3):
        present = (rng.random(num_clips) < 0.4).astype(np.float32)[:, None, None, None]
        cy, cx = (rng.uniform(0, size, num_clips)[:, None, None, None] for _ in range(2))
        sigma = rng.uniform(1.0, 2.5, num_clips)[:, None, None, None]
        amp = present * rng.uniform(0.3, 0.9, num_clips)[:, None, None, None]
        begin = rng.uniform(-4.0, num_frames, num_clips)[:, None, None, None]
        length = rng.uniform(2.0, 6.0, num_clips)[:, None, None, None]
        spot = amp * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))  # (N, 1, H, W)
        inflow = inflow + spot * np.exp(-(((frames - begin - 0.25 * length) / (0.25 * length)) ** 2))
        outflow = outflow + spot * np.exp(-(((frames - begin - 0.75 * length) / (0.25 * length)) ** 2))

    level = rng.uniform(0.85, 1.15, num_clips)[:, None, None, None, None]  # weather, season
    rate = level * np.stack([inflow, outflow], axis=2)  # (N, T, 2, H, W)
    counts = rng.poisson(rate * counts_scale).astype(np.float32)
    return np.clip(counts / (2.0 * counts_scale), 0.0, 1.0)


# ---------------------------------------------------------------------------------------------------------
# rain nowcasting


def simulate_rain_nowcast(
    rng: np.random.Generator, num_clips: int, num_frames: int = 25, size: int = 64, margin: int = 16, spinup: int = 12
) -> np.ndarray:
    """Advected, growing and decaying rain (N, T, 1, size, size) float32 in [0, 1].

    Simulated on a (size + 2 margin)^2 domain so that rain enters from upwind; each step: semi-Lagrangian
    advection (departure points upwind along the local wind, bilinear interpolation) of convective and
    stratiform rain, decay of both, and a source for every live convective cell (intensity sin^2 over its
    life, carried by the wind). The wind is a turning mean wind plus a divergence-free perturbation.
    """
    n, full, cells, modes = num_clips, size + 2 * margin, 14, 3
    f = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float64)).float()  # noqa: E731
    speed = f(rng.uniform(0.3, 1.5, n))[:, None, None]  # mean wind, px/frame
    angle0 = f(rng.uniform(0, 2 * np.pi, n))[:, None, None]
    turn = f(rng.normal(0.0, 0.02, n))[:, None, None]  # rad/frame
    # perturbation: stream function psi = sum_m a_m sin(kx x + ky y + phase_m + drift_m s)
    k_len = rng.uniform(2 * np.pi / 128, 2 * np.pi / 48, (n, modes))
    k_dir = rng.uniform(0, 2 * np.pi, (n, modes))
    kx, ky = f(k_len * np.cos(k_dir))[..., None, None], f(k_len * np.sin(k_dir))[..., None, None]  # (N, M, 1, 1)
    amp = f(rng.uniform(0.2, 0.6, (n, modes)) / k_len)[..., None, None]  # velocity amplitude 0.2-0.6 px/frame
    phase = f(rng.uniform(0, 2 * np.pi, (n, modes)))[..., None, None]
    drift = f(rng.normal(0.0, 0.05, (n, modes)))[..., None, None]
    coords = torch.arange(full, dtype=torch.float32)

    def wind_on_grid(s: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(u, v) (N, L, L) at step s; cos(kx x + ky y + p) expanded into products of 1-D terms."""
        ax = kx * coords[None, None, None, :]  # (N, M, 1, L)
        ay = ky * coords[None, None, :, None] + phase + drift * s  # (N, M, L, 1)
        cos = torch.cos(ax) * torch.cos(ay) - torch.sin(ax) * torch.sin(ay)  # (N, M, L, L)
        angle = angle0 + turn * s
        u = speed * torch.cos(angle) + (amp * ky * cos).sum(dim=1)
        v = speed * torch.sin(angle) - (amp * kx * cos).sum(dim=1)
        return u, v

    def wind_at(x: torch.Tensor, y: torch.Tensor, s: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(u, v) (N, K) at the points x, y (N, K)."""
        cos = torch.cos(
            kx[..., 0] * x[:, None] + ky[..., 0] * y[:, None] + phase[..., 0] + drift[..., 0] * s
        )  # (N, M, K)
        angle = (angle0 + turn * s)[..., 0]
        u = speed[..., 0] * torch.cos(angle) + (amp[..., 0] * ky[..., 0] * cos).sum(dim=1)
        v = speed[..., 0] * torch.sin(angle) - (amp[..., 0] * kx[..., 0] * cos).sum(dim=1)
        return u, v

    # convective cells: birth step, lifetime, peak source rate, size, and position (moved with the wind)
    birth = f(rng.uniform(-spinup, num_frames + spinup, (n, cells)))
    life = f(rng.uniform(15.0, 40.0, (n, cells)))
    peak = f(rng.uniform(0.05, 0.25, (n, cells)))
    sig_x, sig_y = (f(rng.uniform(1.5, 5.0, (n, cells)))[..., None] for _ in range(2))  # (N, K, 1)
    cell_x, cell_y = (f(rng.uniform(0, full - 1, (n, cells))) for _ in range(2))  # (N, K)

    # stratiform rain: a smooth random field (sum of plane waves), thresholded
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")
    smooth = torch.zeros(n, full, full)
    for _ in range(6):
        k = f(2 * np.pi / rng.uniform(24.0, 72.0, n))[:, None, None]
        d = f(rng.uniform(0, 2 * np.pi, n))[:, None, None]
        p = f(rng.uniform(0, 2 * np.pi, n))[:, None, None]
        smooth += torch.cos(k * (torch.cos(d) * gx + torch.sin(d) * gy) + p)
    strat = 0.6 * (smooth / math.sqrt(6.0) - f(rng.uniform(0.1, 0.7, n))[:, None, None]).clamp_min(0.0)
    rain = torch.stack([torch.zeros_like(strat), strat], dim=1)  # (N, 2 [convective, stratiform], L, L)
    keep = 1.0 - torch.tensor([0.07, 0.01])[None, :, None, None]  # decay per frame

    frames = []
    for s in range(spinup + num_frames):
        t = float(s - spinup)
        u, v = wind_on_grid(t)
        grid = torch.stack([(gx - u) / (full - 1) * 2 - 1, (gy - v) / (full - 1) * 2 - 1], dim=-1)  # (N, L, L, 2)
        rain = F.grid_sample(rain, grid, mode="bilinear", padding_mode="zeros", align_corners=True) * keep
        rate = peak * torch.sin(math.pi * ((t - birth) / life).clamp(0.0, 1.0)) ** 2  # (N, K)
        # sum_k rate_k exp(-dx^2 / 2sx^2) exp(-dy^2 / 2sy^2), as one batched product of 1-D profiles
        ex = torch.exp(-((coords - cell_x[..., None]) ** 2) / (2 * sig_x**2))  # (N, K, L)
        ey = torch.exp(-((coords - cell_y[..., None]) ** 2) / (2 * sig_y**2))  # (N, K, L)
        rain[:, 0] += torch.einsum("nk,nky,nkx->nyx", rate, ey, ex)
        cu, cv = wind_at(cell_x, cell_y, t)
        cell_x, cell_y = cell_x + cu, cell_y + cv
        if s >= spinup:
            frames.append(torch.tanh(rain.sum(dim=1))[:, margin : margin + size, margin : margin + size])
    return torch.stack(frames, dim=1)[:, :, None].clamp(0.0, 1.0).numpy()


# ---------------------------------------------------------------------------------------------------------
# robot shapes


def simulate_robot_shapes(rng: np.random.Generator, num_clips: int, num_frames: int = 12, size: int = 64) -> np.ndarray:
    """Coloured shapes on a table with a robot arm and camera drift (N, T, 3, size, size) float32 in [0, 1].

    Rendered analytically with anti-aliased edges: a polygon (3, 4 or 6 sides) or disc is the set where its
    signed distance is < 0; objects are drawn back to front, the arm last (it occludes everything).
    """
    n, objs = num_clips, 5
    f = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float64)).float()  # noqa: E731
    t = torch.arange(num_frames, dtype=torch.float32)[None, :, None]  # (1, T, 1)
    # camera drift (pixels), slowly accelerating
    cam = f(rng.normal(0.0, 0.6, (n, 1, 2))) * t + f(rng.normal(0.0, 0.04, (n, 1, 2))) * t**2  # (N, T, 2)
    coords = torch.arange(size, dtype=torch.float32)
    py, px = torch.meshgrid(coords, coords, indexing="ij")
    wx = px[None, None] + cam[..., 0, None, None]  # (N, T, H, W) world coordinates of each pixel
    wy = py[None, None] + cam[..., 1, None, None]

    # table: base colour with a wood-like grain and a few stains, fixed in the world
    base = f(rng.uniform(0.45, 0.8, (n, 3)) * rng.uniform(0.85, 1.0, (n, 1)))
    grain = torch.zeros_like(wx)
    for _ in range(3):
        k = f(rng.uniform(0.08, 0.5, n))[:, None, None, None]
        d = f(rng.uniform(0, np.pi, n))[:, None, None, None]
        p = f(rng.uniform(0, 2 * np.pi, n))[:, None, None, None]
        grain += f(rng.uniform(0.02, 0.06, n))[:, None, None, None] * torch.sin(
            k * (torch.cos(d) * wx + torch.sin(d) * wy) + p
        )
    for _ in range(4):
        sx, sy = (f(rng.uniform(-8, size + 8, n))[:, None, None, None] for _ in range(2))
        r = f(rng.uniform(2.0, 6.0, n))[:, None, None, None]
        grain -= 0.12 * torch.exp(-((wx - sx) ** 2 + (wy - sy) ** 2) / (2 * r * r))
    image = (base[:, None, :, None, None] + grain[:, :, None]).clamp(0.0, 1.0)  # (N, T, 3, H, W)

    def paint(image: torch.Tensor, distance: torch.Tensor, colour: torch.Tensor) -> torch.Tensor:
        alpha = (0.5 - distance).clamp(0.0, 1.0)[:, :, None]  # (N, T, 1, H, W), 1-pixel anti-aliasing
        return image * (1 - alpha) + colour * alpha

    # objects: kind (0 disc, else polygon sides), radius, colour, position bouncing in the world box, spin
    sides = f(rng.choice([0, 3, 4, 6], (n, objs)))
    radius = f(rng.uniform(5.0, 10.0, (n, objs)))
    hue = rng.uniform(0, 1, (n, objs))
    colour = f(np.stack([np.clip(np.abs((hue * 6 + o) % 6 - 3) - 1, 0, 1) for o in (0, 4, 2)], axis=-1))
    colour = colour * f(rng.uniform(0.55, 1.0, (n, objs, 1))) + f(rng.uniform(0.0, 0.15, (n, objs, 1)))
    start = f(rng.uniform(10, size - 10, (n, objs, 2)))
    velocity = f(rng.normal(0.0, 1.2, (n, objs, 2)))
    rot0 = f(rng.uniform(0, 2 * np.pi, (n, objs)))
    spin = f(rng.normal(0.0, 0.1, (n, objs)))
    for o in range(objs):
        r = radius[:, o, None]  # (N, 1)
        low, span = r, size - 2 * r
        raw = start[:, o, None, :] - low[..., None] + velocity[:, o, None, :] * t  # (N, T, 2)
        folded = torch.remainder(raw, 2 * span[..., None])
        centre = low[..., None] + torch.where(folded > span[..., None], 2 * span[..., None] - folded, folded)
        dx = wx - centre[..., 0, None, None]  # (N, T, H, W)
        dy = wy - centre[..., 1, None, None]
        k = sides[:, o, None, None, None]
        angle = (rot0[:, o, None] + spin[:, o, None] * t[..., 0])[..., None, None]  # (N, T, 1, 1)
        polygon = torch.full_like(dx, -1e9)
        for j in range(6):
            a = angle + 2 * math.pi * torch.remainder(torch.full_like(k, float(j)), k.clamp_min(1)) / k.clamp_min(1)
            polygon = torch.maximum(polygon, dx * torch.cos(a) + dy * torch.sin(a))
        apothem = r[..., None, None] * torch.cos(math.pi / k.clamp_min(3))
        distance = torch.where(k == 0, torch.sqrt(dx * dx + dy * dy) - r[..., None, None], polygon - apothem)
        shade = 1.0 + 0.25 * (-(dx + dy) / (2 * r[..., None, None])).clamp(-1.0, 1.0)  # light from the top left
        obj_colour = (colour[:, o, None, :, None, None] * shade[:, :, None]).clamp(0.0, 1.0)  # (N, T, 3, H, W)
        image = paint(image, distance, obj_colour)

    # robot arm: a gripper on a smooth random path and the link to the top of the view
    gx0, gy0 = f(rng.uniform(16, size - 16, n))[:, None], f(rng.uniform(20, size - 20, n))[:, None]
    arm = []
    for centre in (gx0, gy0):
        w1, w2 = (f(rng.uniform(0.1, 0.35, n))[:, None] for _ in range(2))
        a1, a2 = (f(rng.uniform(4.0, 12.0, n))[:, None] for _ in range(2))
        p1, p2 = (f(rng.uniform(0, 2 * np.pi, n))[:, None] for _ in range(2))
        arm.append(centre + a1 * torch.sin(w1 * t[..., 0] + p1) + a2 * torch.sin(w2 * t[..., 0] + p2))  # (N, T)
    ax, ay = (c[..., None, None] for c in arm)  # gripper in view coordinates: the camera carries the arm
    vx, vy = px[None, None], py[None, None]
    link = torch.maximum((vx - ax).abs() - 3.0, vy - ay)
    gripper = torch.maximum((vx - ax).abs() - 7.0, (vy - ay).abs() - 4.0)
    fingers = torch.maximum(((vx - ax).abs() - 5.0).abs() - 1.5, (vy - ay - 6.0).abs() - 3.0)
    image = paint(image, link, torch.tensor([0.22, 0.22, 0.25])[None, None, :, None, None])
    image = paint(image, torch.minimum(gripper, fingers), torch.tensor([0.35, 0.35, 0.38])[None, None, :, None, None])
    return image.clamp(0.0, 1.0).numpy()


# ---------------------------------------------------------------------------------------------------------
# loaders


@contextmanager
def _one_torch_thread() -> Iterator[None]:
    """Run torch on one thread: the simulators' tensors are small, and several threads competing with other
    processes (e.g. one generator per training process) were measured to be up to 10x slower than one."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _generate(task: str, seed: int, split: str, num_clips: int, in_frames: int, options: dict) -> Iterator[Example]:
    """Yield the clips of one split, simulated chunk by chunk from independent random streams."""
    spec = SPECS[task]
    simulate = _simulator(task, seed, split, options)
    show = num_clips >= PROGRESS_MIN_CLIPS and datasets.is_progress_bar_enabled()
    with tqdm(total=num_clips, desc=f"{task} ({split})", unit="clip", disable=not show) as bar:
        for chunk, begin in enumerate(range(0, num_clips, CHUNK)):
            count = min(CHUNK, num_clips - begin)
            with _one_torch_thread():
                clips = simulate(split_rng(seed, task, split, chunk), count)  # (n, T + T', C, H, W)
            expected = (count, spec.in_frames + spec.out_frames, spec.channels, spec.height, spec.width)
            assert clips.shape == expected, f"{task} simulator returned {clips.shape}, expected {expected}"
            for clip in clips.astype(np.float16):
                yield {"inputs": clip[:in_frames], "targets": clip[in_frames:]}
            bar.update(count)


def _simulator(task: str, seed: int, split: str, options: dict) -> Callable[[np.random.Generator, int], np.ndarray]:
    """`simulate(rng, n) -> (n, T + T', C, H, W)` for a task, with what it shares across chunks set up once."""
    spec = SPECS[task]
    frames = spec.in_frames + spec.out_frames
    if task == "moving_digits":
        digits = _digit_pool(options["mnist_path"], split)
        return lambda rng, n: render_moving_digits(rng, digits, n, frames, options["num_digits"], spec.height)
    if task == "city_traffic":
        city = _city_maps(split_rng(seed, task, "city"), spec.height)  # one city, shared by all splits
        return lambda rng, n: simulate_city_traffic(rng, n, city, frames)
    if task == "rain_nowcast":
        return lambda rng, n: simulate_rain_nowcast(rng, n, frames, spec.height)
    if task == "robot_shapes":
        return lambda rng, n: simulate_robot_shapes(rng, n, frames, spec.height)
    raise ValueError(f"no simulator for task {task!r}")


def _load_synthetic(
    task: str, seed: int, sizes: dict[str, int], options: dict, cache_dir: str | None, cache_key: dict | None = None
) -> datasets.DatasetDict:
    spec = SPECS[task]
    for split, count in sizes.items():
        if not isinstance(count, int) or count < 1:
            raise ValueError(f"{task}: num_{split} must be a positive int, got {count!r}")
    generators = {
        split: (
            _generate,
            {
                "task": task,
                "seed": int(seed),
                "split": split,
                "num_clips": count,
                "in_frames": spec.in_frames,
                "options": options,
            },
        )
        for split, count in sizes.items()
    }
    return build_splits(task, generators, spec.input_shape, spec.target_shape, VERSION, cache_dir, cache_key)


def load_moving_digits(
    data_dir: str | None = None,
    seed: int = 0,
    num_train: int = 1000,
    num_validation: int = 100,
    num_test: int = 200,
    num_digits: int = 2,
    mnist_path: str | None = None,
    cache_dir: str | None = None,
) -> datasets.DatasetDict:
    """Moving digits, 10 -> 10 frames of 1x64x64 in [0, 1] (trajectory discipline).

    Args:
        data_dir: unused (the task needs no files).
        seed: seed of all random choices.
        num_train, num_validation, num_test: clips per split.
        num_digits: digits per clip (2 as Moving MNIST).
        mnist_path: an MNIST idx3 image file (`train-images-idx3-ubyte[.gz]`) or a folder holding one, to use
            real MNIST digits instead of scikit-learn's upscaled 8x8 digits.
        cache_dir: where `datasets` stores the clips (default: its usual cache).

    The last 20% of the digit images appear only in the test split.
    """
    digits_file = None if mnist_path is None else mnist_file(mnist_path)
    if digits_file is not None:
        read_idx_images(digits_file)  # fail now, with a clear message, rather than inside the generator
    options = {"num_digits": int(num_digits), "mnist_path": None if digits_file is None else str(digits_file)}
    key = {"mnist": None if digits_file is None else file_signature(digits_file)}
    sizes = {"train": num_train, "validation": num_validation, "test": num_test}
    return _load_synthetic("moving_digits", seed, sizes, options, cache_dir, key)


def _simulated_task_loader(task: str, summary: str) -> Callable[..., datasets.DatasetDict]:
    """The loader of a simulated task whose only options are the split sizes and the cache folder."""

    def load(
        data_dir: str | None = None,
        seed: int = 0,
        num_train: int = 1000,
        num_validation: int = 100,
        num_test: int = 200,
        cache_dir: str | None = None,
    ) -> datasets.DatasetDict:
        sizes = {"train": num_train, "validation": num_validation, "test": num_test}
        return _load_synthetic(task, seed, sizes, {}, cache_dir)

    load.__name__ = load.__qualname__ = f"load_{task}"
    load.__doc__ = f"{summary}\n\n`data_dir` is unused; `num_*` are clips per split; `cache_dir` as in `load_task`."
    return load


load_city_traffic = _simulated_task_loader(
    "city_traffic",
    "City crowd flows, 4 -> 4 frames of 2x32x32 (inflow, outflow) in [0, 1] (traffic discipline).\n\n"
    "One city per seed (the same in all splits); each clip starts at a random 30-minute slot of the week.",
)
load_rain_nowcast = _simulated_task_loader(
    "rain_nowcast",
    "Rain nowcasting, 13 -> 12 frames of 1x64x64 VIL-like levels in [0, 1] (weather discipline).\n\n"
    "CSI thresholds: `RAIN_CSI_THRESHOLDS`, SEVIR's VIL levels (16, 74, 133, 160, 181, 219) / 255.",
)
load_robot_shapes = _simulated_task_loader(
    "robot_shapes", "Robot pushing-like scenes, 2 -> 10 frames of 3x64x64 RGB in [0, 1] (driving/robot discipline)."
)


SPECS = {
    "moving_digits": TaskSpec("moving_digits", 10, 10, 1, 64, 64, discipline="trajectory"),
    "city_traffic": TaskSpec("city_traffic", 4, 4, 2, 32, 32, discipline="traffic"),
    "rain_nowcast": TaskSpec("rain_nowcast", 13, 12, 1, 64, 64, discipline="weather"),
    "robot_shapes": TaskSpec("robot_shapes", 2, 10, 3, 64, 64, discipline="driving"),
}

for _name, _loader, _thresholds, _description in (
    ("moving_digits", load_moving_digits, (), "two bouncing digits (Moving MNIST-like)"),
    ("city_traffic", load_city_traffic, (), "in/out crowd flows of a city grid (TaxiBJ-like)"),
    ("rain_nowcast", load_rain_nowcast, RAIN_CSI_THRESHOLDS, "advected growing/decaying rain (SEVIR-like)"),
    ("robot_shapes", load_robot_shapes, (), "shapes, robot arm and camera drift (BAIR-like)"),
):
    register_task(
        TaskInfo(
            name=_name,
            spec=SPECS[_name],
            discipline=SPECS[_name].discipline,
            metrics=DEFAULT_METRICS + (("csi",) if _thresholds else ()),
            csi_thresholds=_thresholds,
            synthetic=True,
            loader=_loader,
            description=_description,
        )
    )

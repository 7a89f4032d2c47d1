"""unistd_hf.metrics against scikit-image and numpy, the accumulator, and the `evaluate` module."""

import evaluate
import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from unistd_hf import metrics as M


def _random_pair(shape=(2, 3, 2, 32, 40), noise=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(shape, generator=g)
    pred = (target + noise * torch.randn(shape, generator=g)).clamp(0, 1)
    return pred, target


def _structured_pair(B=2, T=3, C=3, H=48, W=48):
    """Smooth moving blobs and stripes: the kind of frames SSIM is meant for (not white noise)."""
    y, x = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    frames = []
    for b in range(B):
        clip = []
        for t in range(T):
            chans = [
                0.5 + 0.5 * torch.sin((x + 2 * t + 5 * b) / (4 + c)) * torch.exp(-((y - 20 - t) ** 2) / 200)
                for c in range(C)
            ]
            clip.append(torch.stack(chans))
        frames.append(torch.stack(clip))
    target = torch.stack(frames).float()  # (B, T, C, H, W)
    pred = torch.roll(target, shifts=1, dims=-1) * 0.9 + 0.05
    return pred, target


def _skimage_per_frame(pred, target, fn):
    B, T = pred.shape[:2]
    return np.array([[fn(pred[b, t].numpy(), target[b, t].numpy()) for t in range(T)] for b in range(B)])


@pytest.mark.parametrize("pair", [_random_pair, _structured_pair], ids=["random", "structured"])
@pytest.mark.parametrize("window", ["gaussian", "uniform"])
def test_ssim_matches_skimage(pair, window):
    pred, target = pair()

    def reference(p, t):  # (C, H, W) frames
        return structural_similarity(
            np.moveaxis(p, 0, -1),
            np.moveaxis(t, 0, -1),
            channel_axis=-1,
            data_range=1.0,
            gaussian_weights=window == "gaussian",
            sigma=1.5,
            use_sample_covariance=window == "uniform",
        )

    expected = _skimage_per_frame(pred, target, reference)
    np.testing.assert_allclose(M.ssim_per_frame(pred, target, window).numpy(), expected, atol=1e-4)
    assert M.ssim(pred, target, window).item() == pytest.approx(expected.mean(), abs=1e-4)


def test_ssim_data_range_matches_skimage():
    pred, target = _random_pair(shape=(1, 2, 1, 24, 24))
    expected = _skimage_per_frame(
        pred, target, lambda p, t: structural_similarity(p[0], t[0], data_range=2.0)
    )  # OpenSTL's effective setting: uniform window, data range 2
    np.testing.assert_allclose(M.ssim_per_frame(pred, target, "uniform", data_range=2.0).numpy(), expected, atol=1e-4)


@pytest.mark.parametrize("pair", [_random_pair, _structured_pair], ids=["random", "structured"])
def test_psnr_matches_skimage(pair):
    pred, target = pair()
    expected = _skimage_per_frame(pred, target, lambda p, t: peak_signal_noise_ratio(t, p, data_range=1.0))
    np.testing.assert_allclose(M.psnr_per_frame(pred, target).numpy(), expected, atol=1e-4)
    assert M.psnr(pred, target).item() == pytest.approx(expected.mean(), abs=1e-4)


def test_psnr_is_finite_for_a_perfect_frame():
    pred, target = _random_pair(shape=(1, 2, 1, 8, 8))
    assert M.psnr(target, target).item() == pytest.approx(100.0)


def test_mse_mae_match_numpy():
    pred, target = _random_pair()
    p, t = pred.double().numpy(), target.double().numpy()
    assert M.mse(pred, target).item() == pytest.approx(np.mean((p - t) ** 2), rel=1e-12)
    assert M.mae(pred, target).item() == pytest.approx(np.mean(np.abs(p - t)), rel=1e-12)
    assert M.rmse(pred, target).item() == pytest.approx(np.sqrt(np.mean((p - t) ** 2)), rel=1e-12)
    # OpenSTL: np.mean(err, axis=(0, 1)).sum()
    assert M.mse_openstl(pred, target).item() == pytest.approx(np.mean((p - t) ** 2, axis=(0, 1)).sum(), rel=1e-12)
    assert M.mae_openstl(pred, target).item() == pytest.approx(np.mean(np.abs(p - t), axis=(0, 1)).sum(), rel=1e-12)


def test_csi_hand_computed():
    target = torch.tensor([0.1, 0.5, 0.6, 0.9, 0.2, 0.3]).view(1, 1, 1, 2, 3)
    pred = torch.tensor([0.5, 0.1, 0.7, 0.9, 0.2, 0.5]).view(1, 1, 1, 2, 3)
    # threshold 0.5 (>=): target events at 1, 2, 3; predicted at 0, 2, 3, 5 -> hits 2, misses 1, false alarms 2
    assert M.csi_counts(pred, target, 0.5).tolist() == [2.0, 1.0, 2.0]
    assert M.csi(pred, target, 0.5).item() == pytest.approx(2 / 5, abs=1e-6)
    assert M.csi(pred, target, 0.95).item() == pytest.approx(1.0)  # no event anywhere


def test_copy_last_frame_baseline():
    inputs = torch.rand(2, 4, 3, 8, 8)
    out = M.copy_last_frame_baseline(inputs, 5)
    assert out.shape == (2, 5, 3, 8, 8)
    assert torch.equal(out[:, 3], inputs[:, -1])


def test_accumulator_equals_metrics_on_concatenation():
    batches = [_random_pair(shape=(b, 3, 2, 16, 16), noise=0.2, seed=s) for s, b in enumerate((2, 3, 1))]
    acc = M.MetricAccumulator(M.METRIC_NAMES, csi_thresholds=(0.3, 0.7), ssim_window="uniform")
    for pred, target in batches:
        acc.update(pred, target)
    result = acc.compute()
    pred = torch.cat([p for p, _ in batches])
    target = torch.cat([t for _, t in batches])
    expected = {
        "mse": M.mse(pred, target),
        "mae": M.mae(pred, target),
        "rmse": M.rmse(pred, target),
        "psnr": M.psnr(pred, target),
        "ssim": M.ssim(pred, target, "uniform"),
        "ssim_openstl": M.ssim_openstl(pred, target),
        "mse_openstl": M.mse_openstl(pred, target),
        "mae_openstl": M.mae_openstl(pred, target),
        "csi@0.3": M.csi(pred, target, 0.3),
        "csi@0.7": M.csi(pred, target, 0.7),
    }
    assert set(result) == set(expected)
    for name, value in expected.items():
        assert result[name] == pytest.approx(value.item(), rel=1e-9), name


def test_accumulator_reduce_fn_combines_processes():
    (p1, t1), (p2, t2) = _random_pair(shape=(2, 2, 1, 16, 16), seed=1), _random_pair(shape=(3, 2, 1, 16, 16), seed=2)
    a, b, both = M.MetricAccumulator(), M.MetricAccumulator(), M.MetricAccumulator()
    a.update(p1, t1)
    b.update(p2, t2)
    both.update(torch.cat([p1, p2]), torch.cat([t1, t2]))
    assert a.state_tensor().dtype == torch.float64
    combined = a.compute(reduce_fn=lambda state: state + b.state_tensor())  # what an all-reduce sum does
    for name, value in both.compute().items():
        assert combined[name] == pytest.approx(value, rel=1e-9), name


def test_accumulator_clips_predictions_for_psnr_ssim_only():
    pred, target = _random_pair(shape=(1, 2, 1, 16, 16))
    pred = pred * 1.5 - 0.25  # outside [0, 1]
    acc = M.MetricAccumulator()
    acc.update(pred, target)
    result = acc.compute()
    assert result["mse"] == pytest.approx(M.mse(pred, target).item())
    assert result["psnr"] == pytest.approx(M.psnr(pred.clamp(0, 1), target).item())


def test_errors_are_clear():
    with pytest.raises(ValueError, match=r"\(B, T, C, H, W\)"):
        M.mse(torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match="same|shape"):
        M.psnr(torch.rand(1, 2, 1, 8, 8), torch.rand(1, 3, 1, 8, 8))
    with pytest.raises(ValueError, match="at least 11x11"):
        M.ssim(torch.rand(1, 1, 1, 8, 8), torch.rand(1, 1, 1, 8, 8))
    with pytest.raises(ValueError, match="unknown metric"):
        M.MetricAccumulator(["mse", "lpips"])
    with pytest.raises(ValueError, match="csi_thresholds"):
        M.MetricAccumulator(["csi"])
    with pytest.raises(ValueError, match="before any update"):
        M.MetricAccumulator().compute()


def test_evaluate_module_matches_accumulator():
    metric = evaluate.load(M.EVALUATE_MODULE_PATH)
    pred, target = _random_pair(shape=(3, 2, 1, 16, 16))
    metric.add_batch(predictions=pred[:2].numpy(), references=target[:2].numpy())
    metric.add_batch(predictions=pred[2:].numpy(), references=target[2:].numpy())
    result = metric.compute(csi_thresholds=[0.5], ssim_window="uniform")
    acc = M.MetricAccumulator(csi_thresholds=[0.5], ssim_window="uniform")
    acc.update(pred, target)
    for name, value in acc.compute().items():
        assert result[name] == pytest.approx(value, rel=1e-6), name

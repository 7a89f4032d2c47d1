"""An `evaluate` metric module wrapping `unistd_hf.metrics`.

import evaluate, unistd_hf.metrics
metric = evaluate.load(unistd_hf.metrics.EVALUATE_MODULE_PATH)   # or the path of this folder / file
metric.add_batch(predictions=pred, references=target)            # (B, T, C, H, W) in [0, 1]
metric.compute(csi_thresholds=[0.29], ssim_window="uniform")     # {"mse": ..., "csi@0.29": ...}
"""

import datasets
import evaluate
import numpy as np
import torch

from unistd_hf.metrics import DEFAULT_METRICS, MetricAccumulator, nino34_scores

_DESCRIPTION = (
    "Spatio-temporal forecast metrics on clips in [0, 1]: MSE/MAE per pixel and in OpenSTL's convention, RMSE, "
    "PSNR and SSIM per frame, CSI at thresholds (see unistd_hf.metrics)."
)
_KWARGS_DESCRIPTION = """
Args:
    predictions: clips (T, C, H, W) per example, values in [0, 1].
    references: clips of the same shape.
    metrics: names among mse, mae, rmse, psnr, ssim, ssim_openstl, mse_openstl, mae_openstl, csi (default: all but csi).
    csi_thresholds: thresholds reported as "csi@<threshold>".
    ssim_window: "gaussian" (default) or "uniform" (scikit-image's default, used by OpenSTL).
    data_range: data range of PSNR and SSIM (1.0).
    nino34_value_range: for ENSO SST clips (T, 1, 24, 48), the loader's (min, max) SST (e.g.
        `get_task("enso").spec.value_range`); adds nino34_corr, nino34_wcorr and nino34_mse.
Returns:
    a dict of floats keyed by metric name.
"""

_CLIP = datasets.Sequence(datasets.Sequence(datasets.Sequence(datasets.Sequence(datasets.Value("float32")))))


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class UniSTDMetrics(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": _CLIP, "references": _CLIP}),
        )

    def _compute(
        self,
        predictions,
        references,
        metrics=DEFAULT_METRICS,
        csi_thresholds=(),
        ssim_window="gaussian",
        data_range=1.0,
        nino34_value_range=None,
    ):
        pred = torch.as_tensor(np.asarray(predictions, dtype=np.float32))  # (N, T, C, H, W)
        target = torch.as_tensor(np.asarray(references, dtype=np.float32))
        accumulator = MetricAccumulator(metrics, csi_thresholds, ssim_window=ssim_window, data_range=data_range)
        accumulator.update(pred, target)
        results = accumulator.compute()
        if nino34_value_range is not None:
            results.update(nino34_scores(pred, target, tuple(nino34_value_range)))
        return results

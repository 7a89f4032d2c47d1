"""Trainable / total parameters of UniSTD on a ViT-B/16-sized CLIP backbone with the paper's RankMoE setting.

No weights are needed: the backbone is built from `CLIPVisionConfig` (hidden 768, 12 layers, 12 heads, MLP 3072,
patch 16). Counts depend on the task specs only through the per-task heads (frames x C' projections and the convs).

Task specs: the 10 tasks of the paper's Table 1 could not be read here, so the shapes are the standard OpenSTL /
PredBench / Earthformer settings of the datasets the paper names (assumptions are marked):
MMNIST, KTH, Human3.6M, BAIR (trajectory / robot), KITTI (assumed: OpenSTL KittiCaltech 10->1), Cityscapes
(assumed 2->10 at 128x128), TaxiBJ (traffic), SEVIR, ICAR-ENSO, WeatherBench t2m 5.625 deg (weather).
`num_downsample` is chosen per task for a 6x12 to 24x24 token grid.

    python examples/parameter_count.py
"""

import torch
from transformers import CLIPVisionConfig

from unistd_hf import TaskSpec, UniSTDConfig, get_unistd_peft_model
from unistd_hf.modeling_unistd import format_parameter_report, parameter_report

PAPER_TASKS = [
    TaskSpec("mmnist", 10, 10, 1, 64, 64, num_downsample=2, discipline="trajectory"),
    TaskSpec("kth", 10, 20, 1, 128, 128, num_downsample=3, discipline="trajectory"),
    TaskSpec("human36m", 4, 4, 3, 128, 128, num_downsample=3, discipline="trajectory"),
    TaskSpec("bair", 2, 10, 3, 64, 64, num_downsample=2, discipline="trajectory"),
    TaskSpec("kitti", 10, 1, 3, 128, 160, num_downsample=3, discipline="driving"),
    TaskSpec("cityscapes", 2, 10, 3, 128, 128, num_downsample=3, discipline="driving"),
    TaskSpec("taxibj", 4, 4, 2, 32, 32, num_downsample=1, discipline="traffic"),
    TaskSpec("sevir", 13, 12, 1, 384, 384, num_downsample=4, discipline="weather"),
    TaskSpec("enso", 12, 14, 1, 24, 48, num_downsample=2, discipline="weather"),
    TaskSpec("weatherbench", 12, 12, 1, 32, 64, num_downsample=2, discipline="weather"),
]

if __name__ == "__main__":
    torch.manual_seed(0)
    backbone = CLIPVisionConfig(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, patch_size=16
    )
    model = get_unistd_peft_model(UniSTDConfig(backbone=backbone, tasks=PAPER_TASKS))
    report = parameter_report(model)
    print(format_parameter_report(report))
    total = report["total"]
    share = 100 * total["trainable"] / total["total"]
    print(f"\ntrainable {total['trainable']:,} of {total['total']:,} ({share:.2f} %)")

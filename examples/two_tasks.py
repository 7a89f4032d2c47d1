"""Build one UniSTD model for two tasks (different frames, channels and resolutions) and run a forward pass.

Runs offline: the backbone is a small randomly initialised CLIP vision encoder. For a pretrained backbone, pass a hub
id or a local directory instead, e.g. `backbone="openai/clip-vit-base-patch16"`.
"""

import torch
from transformers import CLIPVisionConfig

from rankmoe_peft import RankSearch
from unistd_hf import TaskSpec, UniSTDConfig, get_unistd_peft_model
from unistd_hf.report import format_parameter_report, parameter_report

config = UniSTDConfig(
    backbone=CLIPVisionConfig(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=3),
    tasks=[
        TaskSpec("mmnist", in_frames=10, out_frames=10, channels=1, height=64, width=64, num_downsample=2),
        TaskSpec("taxibj", in_frames=4, out_frames=4, channels=2, height=32, width=32, num_downsample=1),
    ],
)
model = get_unistd_peft_model(config)  # frozen backbone + RankMoE experts + per-task heads (the paper's setting)

frames = torch.rand(2, 10, 1, 64, 64)  # (B, T, C, H, W), values in [0, 1]
future = torch.rand(2, 10, 1, 64, 64)  # (B, T', C, H, W)
out = model(pixel_values=frames, task="mmnist", labels=future)
search = RankSearch(model)  # the rank search (rankmoe_peft/search.py): its own SGD on the ranks
loss = out.loss + search.loss()  # MSE + the rank budget penalty (a value; search.step() applies its gradient)
loss.backward()
search.step()
print(out.predictions.shape, out.loss.item())  # torch.Size([2, 10, 1, 64, 64])

print(model(pixel_values=torch.rand(2, 4, 2, 32, 32), task="taxibj").predictions.shape)  # (2, 4, 2, 32, 32)
print(format_parameter_report(parameter_report(model)))

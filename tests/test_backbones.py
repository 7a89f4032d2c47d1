"""RankMoE on other backbones (issue 17, item 4): default target modules that exist in the installed transformers
5.x, built from tiny configs, and GPT-2's `Conv1D` layers (weight stored (in, out)) against the formula."""

from __future__ import annotations

import re

import pytest
import torch
import transformers as T
from peft import PeftModel, get_peft_model
from transformers.pytorch_utils import Conv1D

from rankmoe_peft import RankMoEConfig
from rankmoe_peft.layer import RankMoELayer
from rankmoe_peft.model import DEFAULT_TARGET_MODULES
from helpers import reference_expert, reference_gates

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
VISION = dict(SMALL, image_size=32, patch_size=8)
TEXT = dict(SMALL, vocab_size=99, max_position_embeddings=16)


def pixels() -> dict:
    return {"pixel_values": torch.randn(2, 3, 32, 32)}


def tokens() -> dict:
    return {"input_ids": torch.randint(0, 99, (2, 7))}


# model_type -> (tiny model, inputs, attention projections per layer, layers)
BACKBONES = {
    "clip": (lambda: T.CLIPModel(T.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=16)),
             lambda: {**pixels(), **tokens()}, 4, 4),
    "clip_vision_model": (lambda: T.CLIPVisionModel(T.CLIPVisionConfig(**VISION)), pixels, 4, 2),
    "clip_text_model": (lambda: T.CLIPTextModel(T.CLIPTextConfig(**TEXT)), tokens, 4, 2),
    "siglip": (lambda: T.SiglipModel(T.SiglipConfig(text_config=TEXT, vision_config=VISION)),
               lambda: {**pixels(), **tokens()}, 4, 4),
    "siglip_vision_model": (lambda: T.SiglipVisionModel(T.SiglipVisionConfig(**VISION)), pixels, 4, 2),
    "siglip_text_model": (lambda: T.SiglipTextModel(T.SiglipTextConfig(**TEXT)), tokens, 4, 2),
    "vit": (lambda: T.ViTModel(T.ViTConfig(**VISION)), pixels, 4, 2),
    "dinov2": (lambda: T.Dinov2Model(T.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                    mlp_ratio=2, image_size=32, patch_size=8)), pixels, 4, 2),
    "gpt2": (lambda: T.GPT2Model(T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=99, n_positions=16)),
             tokens, 2, 2),
}


def first_output(out) -> torch.Tensor:
    for name in ("last_hidden_state", "logits_per_image"):
        value = getattr(out, name, None)
        if value is not None:
            return value
    raise AssertionError(f"no tensor output in {type(out).__name__}")


def test_every_default_mapping_is_tested():
    assert set(DEFAULT_TARGET_MODULES) == set(BACKBONES)


@pytest.mark.parametrize("model_type", sorted(BACKBONES))
def test_default_targets_adapt_the_attention_projections(model_type):
    factory, inputs_of, per_layer, layers = BACKBONES[model_type]
    torch.manual_seed(0)
    base = factory().eval()
    assert base.config.model_type == model_type
    inputs = inputs_of()
    with torch.no_grad():
        expected = first_output(base(**inputs)).clone()

    model = get_peft_model(base, RankMoEConfig())  # no target_modules: the default of this model type
    adapted = {name: m for name, m in model.named_modules() if isinstance(m, RankMoELayer)}
    assert len(adapted) == per_layer * layers
    for name, layer in adapted.items():  # attention projections only, never an MLP or a pooling head
        assert re.search(r"(attn|attention)\.", name) and "mlp" not in name and ".head." not in name, name
        assert isinstance(layer.get_base_layer(), (torch.nn.Linear, Conv1D))
    with torch.no_grad():
        torch.testing.assert_close(first_output(model(**inputs)), expected)  # B = 0: the base model's output
        for layer in adapted.values():
            layer.rankmoe_B["default"].normal_(0.0, 0.5)
        perturbed = first_output(model(**inputs))
    assert perturbed.isfinite().all()
    assert (perturbed - expected).abs().max() > 1e-3


def gpt2_layer():
    torch.manual_seed(0)
    factory = BACKBONES["gpt2"][0]
    config = RankMoEConfig(num_experts=3, max_rank=4, init_rank=2.5, init_weights=False)
    model = get_peft_model(factory().eval(), config)  # eval: GPT-2's own dropout off
    return model, model.base_model.model.h[0].attn.c_attn


def test_gpt2_conv1d_layer_matches_formula():
    model, layer = gpt2_layer()
    conv = layer.get_base_layer()
    assert isinstance(conv, Conv1D) and conv.weight.shape == (32, 96)  # (in, out): fan_in_fan_out
    assert layer.in_features == 32 and layer.out_features == 96 and layer.fan_in_fan_out
    assert layer.rankmoe_A["default"].shape == (3, 32, 4) and layer.rankmoe_B["default"].shape == (3, 4, 96)
    with torch.no_grad():
        layer.rankmoe_rank["default"].copy_(torch.tensor([0.7, 2.0, 3.4]))
    x = torch.randn(2, 5, 32)
    A, B = layer.rankmoe_A["default"].detach(), layer.rankmoe_B["default"].detach()
    router = layer.rankmoe_router["default"]
    gates = reference_gates(x, router.weight.detach(), router.bias.detach(), "token", None)
    expected = x @ conv.weight.detach() + conv.bias.detach()  # Conv1D: y = x W + b with W (in, out)
    for e, rank in enumerate([0.7, 2.0, 3.4]):
        expected = expected + layer.scaling["default"] * gates[..., e : e + 1] * reference_expert(x, A[e], B[e], rank)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)  # training path
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)  # cached inference path


def test_gpt2_adapter_trains_and_reloads(tmp_path):
    model, layer = gpt2_layer()
    ids = torch.randint(0, 99, (2, 7))
    model(input_ids=ids).last_hidden_state.pow(2).mean().backward()
    for name in ("rankmoe_A", "rankmoe_B", "rankmoe_rank"):
        assert getattr(layer, name)["default"].grad.abs().sum() > 0, name
    assert layer.get_base_layer().weight.grad is None  # the backbone stays frozen
    with torch.no_grad():
        before = model(input_ids=ids).last_hidden_state
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    reloaded = PeftModel.from_pretrained(BACKBONES["gpt2"][0]().eval(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).last_hidden_state, before)


def test_multihead_attention_out_proj_is_refused_with_a_clear_error():
    base = T.SiglipVisionModel(T.SiglipVisionConfig(**VISION))
    with pytest.raises(ValueError, match="MultiheadAttention"):
        get_peft_model(base, RankMoEConfig(target_modules=["out_proj"]))

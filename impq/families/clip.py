"""CLIP ViT towers (LLaVA's clip-vit-large-patch14-336): a class token and a pre-layernorm."""

from __future__ import annotations

from .record import VIT_AWQ_GROUPS, VisionFamily

CLIP = VisionFamily(
    name="clip", config_class_name="CLIPVisionConfig", model_class_name="CLIPVisionModel", has_class_token=True,
    image_mean=(0.48145466, 0.4578275, 0.40821073), image_std=(0.26862954, 0.26130258, 0.27577711),
    layer_norm_eps=1e-5, hidden_act="quick_gelu",
    hub_towers={"openai/clip-vit-large-patch14-336": {"num_hidden_layers": 24, "num_attention_heads": 16,
                                                      "layer_norm_eps": 1e-5}},
    awq_groups=VIT_AWQ_GROUPS,
    test_config=lambda hidden: {"projection_dim": hidden})

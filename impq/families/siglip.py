"""SigLIP towers (Imp's siglip-so400m-patch14-384): no class token, no pre-layernorm; Imp drops the pooling head."""

from __future__ import annotations

from .record import VIT_AWQ_GROUPS, VisionFamily

SIGLIP = VisionFamily(
    name="siglip", config_class_name="SiglipVisionConfig", model_class_name="SiglipVisionModel", has_class_token=False,
    image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh",
    # depth and head count that Imp's config.json does not write (only the tower's hub name)
    hub_towers={"google/siglip-so400m-patch14-384": {"num_hidden_layers": 27, "num_attention_heads": 16,
                                                     "layer_norm_eps": 1e-6}},
    model_overrides={"vision_use_head": False}, awq_groups=VIT_AWQ_GROUPS,
    test_config=lambda hidden: {"vision_use_head": False})

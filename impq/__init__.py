"""impq: quantize and export small multimodal models (Imp, Bunny, LLaVA) for llama.cpp on phones."""

__version__ = "0.1.0"

"""Running emitted artifacts: the GGUF pair in llama.cpp (through llama-cpp-python and its mtmd bindings)."""

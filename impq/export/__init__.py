"""Writing artifacts: the GGUF text model and the GGUF vision projector (mmproj) that llama.cpp loads."""

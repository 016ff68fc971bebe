"""What a checkpoint is: its layout, its tensors, and the PyTorch reference model built from it."""

"""Task data: the procedural "shapes" VQA task used to train and evaluate the reference model."""

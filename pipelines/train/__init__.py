"""Training: the plain PyTorch loop, the Ray Train worker around it, MLflow tracking."""

"""Bayesian machinery in pure torch: Gaussian quantizer tables and the Laplace posterior. No ONNX here."""

"""BayesQ-ONNX: uncertainty-guided Bayesian post-training quantization that ships standard ONNX."""

__version__ = "0.1.0"

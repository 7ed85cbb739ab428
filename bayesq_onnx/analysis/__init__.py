"""Analysis: what the data says about each weight, before any planning (docs/design.md §3.1, §3.4).

``fit_posterior`` (:class:`~bayesq_onnx.analysis.fit_posterior.FitLaplacePosterior`): the Laplace posterior
from PyTorch gradients on the traced program; ``fit_layer_posterior``
(:class:`~bayesq_onnx.analysis.fit_layer_posterior.FitLayerPosterior`): the layer-wise posterior from
activations collected in ONNX Runtime; ``mc_risk``: the Monte Carlo risk of one quantized block. They are
plain callables over the collected weights, not graph passes: they read the model and change nothing.
"""

"""ONNX Runtime side: sessions on the best provider, fidelity and latency of an artifact."""

"""Pure quantization math (torch / numpy). Nothing here imports ONNX."""

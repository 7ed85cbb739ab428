"""Which ONNX ops read a weight the compiler quantizes, and at which input (op type -> input index; the
op's other operand of inputs 0 and 1 is what multiplies or indexes it). Constants only, so that any module
(the CLI's included) can name them without importing ONNX or torch.

Scope ``linear`` quantizes the linear ops' weights; scope ``all`` adds the embedding tables Gather reads.
"""

LINEAR_WEIGHT_INPUT = {"MatMul": 1, "Gemm": 1, "Conv": 1}
EMBEDDING_WEIGHT_INPUT = {"Gather": 0}
WEIGHT_INPUT = {**LINEAR_WEIGHT_INPUT, **EMBEDDING_WEIGHT_INPUT}

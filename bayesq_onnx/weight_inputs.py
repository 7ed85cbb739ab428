"""Which ONNX ops read a weight the compiler quantizes, and at which input (op type -> input index; the
op's other operand of inputs 0 and 1 is what multiplies or indexes it). Constants only, so that any module
(the CLI's included) can name them without importing ONNX or torch.

Scope ``linear`` quantizes the linear ops' weights; scope ``all`` adds the embedding tables Gather reads.

:data:`WEIGHT_INPUT` holds the readers at one fixed input (what the layer-wise activation taps know).
Further linear readers (:data:`LINEAR_READERS`): a MatMul whose *first* input is the constant (``W @ x``),
either operand of a two-input Einsum, and the ``W`` and ``R`` inputs of the recurrent ops. A weight may also
reach a reader through a chain of layout-only ops (:data:`LAYOUT_OPS`, each reading it at the given input;
``None``: any input), as torch's GRU/LSTM weights reach the ONNX ``GRU``/``LSTM`` op through Slice and Concat,
or a tied table reaches its MatMul through a Transpose.
"""

LINEAR_WEIGHT_INPUT = {"MatMul": 1, "Gemm": 1, "Conv": 1, "ConvTranspose": 1}
EMBEDDING_WEIGHT_INPUT = {"Gather": 0}
WEIGHT_INPUT = {**LINEAR_WEIGHT_INPUT, **EMBEDDING_WEIGHT_INPUT}

RECURRENT_WEIGHT_INPUTS = {"GRU": (1, 2), "LSTM": (1, 2), "RNN": (1, 2)}
LINEAR_READERS = {"MatMul": (0, 1), "Gemm": (1,), "Conv": (1,), "ConvTranspose": (1,), "Einsum": (0, 1),
                  **RECURRENT_WEIGHT_INPUTS}
"""Linear op -> the inputs at which it reads a weight (through a layout chain or directly)."""

LINEAR_OPS = frozenset(LINEAR_READERS)
"""The op types whose weights scope ``linear`` quantizes."""

LAYOUT_OPS = {"Slice": 0, "Split": 0, "Concat": None, "Transpose": 0, "Reshape": 0, "Unsqueeze": 0,
              "Squeeze": 0, "Identity": 0}

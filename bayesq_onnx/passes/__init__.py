"""The onnx_ir passes of the compile (subclasses of ``onnx_ir.passes.PassBase``), one module each, named for
what it does (docs/design.md §6). Analysis and planning are plain callables: :mod:`bayesq_onnx.analysis`,
:mod:`bayesq_onnx.planning`."""

"""UpgradeOpsetPass: raise the default-domain opset to what the plan's dtypes need (int4: 21, int2: 25)."""

from __future__ import annotations

import onnx
import onnx_ir as ir
import onnxscript.version_converter


class UpgradeOpsetPass(ir.passes.InPlacePass):
    """Convert the model to at least ``target`` with onnxscript's version converter (never downgrades),
    and raise the IR version to the lowest one that carries that opset."""

    def __init__(self, target: int):
        super().__init__()
        self.target = target

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        current = model.opset_imports.get("", 1)
        modified = False
        if current < self.target:
            onnxscript.version_converter.convert_version(model, self.target)
            modified = True
        for fn in model.functions.values():
            if fn.opset_imports.get("", model.opset_imports[""]) != model.opset_imports[""]:
                fn.opset_imports[""] = model.opset_imports[""]
                modified = True
        ir_version = onnx.helper.find_min_ir_version_for(
            [onnx.helper.make_opsetid("", model.opset_imports[""])])
        if model.ir_version < ir_version:
            model.ir_version = ir_version
            modified = True
        return ir.passes.PassResult(model, modified=modified)

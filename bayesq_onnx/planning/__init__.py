"""Planning: one candidate and the exact stored values per weight (docs/design.md §3.2–3.5).

``candidates`` says what each weight may take, ``tensor_design`` how one tensor is quantized for one
candidate; the planners (``rtn``, ``gptq``, ``bayesq_fixed``, ``bayesq``) choose and fill in the
:class:`~bayesq_onnx.plan.Plan`; ``methods`` gives each method its frozen config and the builder of its
planner; ``budget_search`` finds the least budget that validates within ``max_drop`` (in ONNX Runtime).
A planner is a plain callable ``weights -> Plan``, not a graph pass: the graph is rewritten afterwards by
:class:`~bayesq_onnx.passes.quantize_weights.QuantizeWeightsPass`.
"""

"""One ONNX graph, two variants: `If U == 1` runs the one-user graph, else the general one.

Both variants take the same contract inputs and return the same outputs
(model/serving_graph.py); the one-user variant broadcasts the user side instead of
gathering it per candidate. An `If` node keeps the bundle at one model.onnx with one
signature (DESIGN.md, contract 2) while single requests take the cheaper path. Names
inside each branch get a prefix, so the two subgraphs never collide; the contract inputs
stay outer-scope names that both branches read.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from model.contract import OUTPUT_NAMES, FeatureSpec, cand_input, hist_input, profile_input, CAND_USER

SINGLE_PREFIX = "one_user/"
GENERAL_PREFIX = "batch/"


def _as_branch(model: onnx.ModelProto, prefix: str, outer: set[str]) -> onnx.GraphProto:
    """The model's graph as a subgraph: no inputs, every inner name prefixed."""
    graph = model.graph
    inner = {i.name for i in graph.initializer} | {o for n in graph.node for o in n.output if o}
    rename = {name: prefix + name for name in inner - outer}

    nodes = []
    for node in graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise ValueError(f"node {node.name} ({node.op_type}) holds a subgraph; branches must be flat")
        new = onnx.NodeProto()
        new.CopyFrom(node)
        new.name = prefix + node.name
        new.ClearField("input")
        new.input.extend(rename.get(i, i) for i in node.input)
        new.ClearField("output")
        new.output.extend(rename.get(o, o) for o in node.output)
        nodes.append(new)
    inits = []
    for init in graph.initializer:
        new = onnx.TensorProto()
        new.CopyFrom(init)
        new.name = rename[init.name]
        inits.append(new)
    outputs = []
    for out in graph.output:
        new = onnx.ValueInfoProto()
        new.CopyFrom(out)
        new.name = rename.get(out.name, out.name)
        outputs.append(new)
    return helper.make_graph(nodes, prefix.rstrip("/"), inputs=[], outputs=outputs, initializer=inits)


def _contract_inputs(spec: FeatureSpec) -> list[onnx.ValueInfoProto]:
    shapes: dict[str, list[str]] = {}
    for f in spec.sequence_fields:
        shapes[hist_input(f)] = ["U", "T"]
    for f in spec.profile_fields:
        shapes[profile_input(f)] = ["U"]
    for f in spec.sequence_fields:
        shapes[cand_input(f)] = ["N"]
    shapes[CAND_USER] = ["N"]
    return [helper.make_tensor_value_info(name, TensorProto.INT64, shapes[name]) for name in spec.input_names()]


def branch_on_single_user(general: bytes, single_user: bytes, spec: FeatureSpec) -> bytes:
    """ONNX bytes: `If(U == 1, single_user, general)` over the contract inputs and outputs."""
    g = onnx.load_from_string(general)
    s = onnx.load_from_string(single_user)
    outer = set(spec.input_names())
    first_hist = hist_input(spec.sequence_fields[0])
    nodes = [
        helper.make_node("Shape", [first_hist], ["user_branch/hist_shape"], start=0, end=1),  # [U]
        helper.make_node("Squeeze", ["user_branch/hist_shape"], ["user_branch/num_users"]),  # U
        helper.make_node("Constant", [], ["user_branch/one"], value=helper.make_tensor("one", TensorProto.INT64, [], [1])),
        helper.make_node("Equal", ["user_branch/num_users", "user_branch/one"], ["user_branch/single"]),
        helper.make_node(
            "If",
            ["user_branch/single"],
            list(OUTPUT_NAMES),
            name="user_branch/if_single_user",
            then_branch=_as_branch(s, SINGLE_PREFIX, outer),
            else_branch=_as_branch(g, GENERAL_PREFIX, outer),
        ),
    ]
    outputs = [
        helper.make_tensor_value_info(OUTPUT_NAMES[0], TensorProto.FLOAT, ["N"]),
        helper.make_tensor_value_info(OUTPUT_NAMES[1], TensorProto.FLOAT, ["N", "T"]),
    ]
    graph = helper.make_graph(nodes, "din_serving", _contract_inputs(spec), outputs)
    model = helper.make_model(graph, opset_imports=list(g.opset_import), producer_name="din-serving-graph")
    model.ir_version = g.ir_version
    onnx.checker.check_model(model)
    return model.SerializeToString()

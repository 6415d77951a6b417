"""A user-given ``.onnx`` file, checked before any session is made: readable, valid, one image input of a
size the graph can take, and within the memory limit.

The input size comes from the ``vismlp_deploy`` metadata or the graph's static (C, H, W); where both
exist they must agree. ONNX shape inference at batch 1 then proves that the graph takes that size
(a 3x1x1 input into a 16x16 patch embedding fails here, not in the runtime) and gives the size of
every intermediate tensor, from which a walk over the nodes in order estimates the peak of live
activations; weights plus that peak must fit the memory limit of ``models.footprint``.
"""
from __future__ import annotations

import math
from pathlib import Path

import onnx
from onnx import helper, shape_inference

from ..errors import UserError, first_line
from ..export.onnx import load_proto, metadata_of
from ..models.footprint import format_bytes, resolve_limit

_PROTOBUF_LIMIT = 2 * 1024**3  # a .onnx protobuf cannot be larger; big weights live in a side .data file


def check_onnx_input(path: Path, max_memory: int | None = None) -> tuple[int, int, int]:
    """(C, H, W) of the image input of the model at ``path``; UserError (one line) for anything that cannot run.

    max_memory: bytes the weights plus the batch-1 activations may take (None: half the available memory).
    """
    if path.stat().st_size > _PROTOBUF_LIMIT:
        raise UserError(f"{path}: {format_bytes(path.stat().st_size)} is beyond protobuf's 2 GiB limit: "
                        "not an ONNX model")
    proto = load_proto(path)
    try:
        onnx.checker.check_model(str(path))  # from the path: handles external data
    except Exception as e:  # noqa: BLE001 - ValidationError, or a side .data file that is missing
        raise UserError(f"{path}: invalid ONNX model ({first_line(e)})") from None
    size = _input_size(path, proto)
    weights = sum(_bytes(t.data_type, t.dims) for t in proto.graph.initializer)
    activations = _activation_peak(path, proto, size)
    limit, how = resolve_limit(max_memory)
    if limit is not None and weights + activations > limit:
        raise UserError(f"{path}: running it at input {'x'.join(map(str, size))} needs about "
                        f"{format_bytes(weights + activations)} ({format_bytes(weights)} weights + "
                        f"{format_bytes(activations)} activations at batch 1), more than the memory limit of "
                        f"{format_bytes(limit)} ({how}); pass max_memory (--max-memory) to raise the limit")
    return size


def _input_size(path: Path, proto: onnx.ModelProto) -> tuple[int, int, int]:
    """(C, H, W): the metadata's ``input_size`` checked against the graph's static dims, or those dims."""
    weights = {t.name for t in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in weights]
    if len(inputs) != 1:
        raise UserError(f"{path}: the graph has {len(inputs)} inputs; an image classifier has one (N, C, H, W)")
    dims = inputs[0].type.tensor_type.shape.dim
    if len(dims) != 4:
        raise UserError(f"{path}: the graph input has rank {len(dims)}, not 4 (N, C, H, W)")
    static = [d.dim_value if d.HasField("dim_value") else None for d in dims[1:]]
    declared = metadata_of(proto).get("input_size")
    if declared is None:
        if None in static or min(static) <= 0:
            raise UserError(f"{path}: cannot tell the input size (no vismlp_deploy metadata, no static C, H, W)")
        return tuple(static)
    if not (isinstance(declared, list) and len(declared) == 3
            and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in declared)):
        raise UserError(f"{path}: corrupt vismlp_deploy metadata: input_size is {declared!r}, "
                        "not three positive integers")
    if any(s is not None and s != n for s, n in zip(static, declared)):
        graph = "x".join("?" if s is None else str(s) for s in static)
        raise UserError(f"{path}: the metadata declares input {'x'.join(map(str, declared))} "
                        f"but the graph takes {graph}")
    return tuple(declared)


def _activation_peak(path: Path, proto: onnx.ModelProto, size: tuple[int, int, int]) -> int:
    """Peak bytes of intermediate tensors alive at once, running the nodes in order at batch 1 (the shapes from
    ONNX shape inference with the input fixed to (1, *size); a tensor lives until its last consumer ran)."""
    graph = proto.graph
    weights = {t.name for t in graph.initializer}
    probe = _shape_probe(proto, size)
    image = probe.graph.input[0]
    try:
        inferred = shape_inference.infer_shapes(probe, strict_mode=True, data_prop=True).graph
    except Exception as e:  # noqa: BLE001 - InferenceError: the graph cannot take this input
        raise UserError(f"{path}: the graph cannot take an input of 1x{'x'.join(map(str, size))} "
                        f"({first_line(e)})") from None
    shapes = {v.name: (v.type.tensor_type.elem_type, [d.dim_value if d.HasField("dim_value") else None
                                                      for d in v.type.tensor_type.shape.dim])
              for v in [*inferred.value_info, *inferred.output, image]}
    empty = next((name for name, (_, dims) in shapes.items() if any(d is not None and d < 1 for d in dims)), None)
    if empty is not None:  # shape inference writes -1 or 0 where a kernel is larger than its input
        dims = "x".join("?" if d is None else str(d) for d in shapes[empty][1])
        raise UserError(f"{path}: the graph cannot take an input of 1x{'x'.join(map(str, size))}: "
                        f"its tensor {empty!r} would have shape {dims}")
    sizes = {name: _bytes(elem, [d or 0 for d in dims]) for name, (elem, dims) in shapes.items()}
    last_use = {name: i for i, node in enumerate(graph.node) for name in node.input}
    live = peak = sizes.get(image.name, 0)
    for i, node in enumerate(graph.node):
        live += sum(sizes.get(o, 0) for o in node.output)
        peak = max(peak, live)
        live -= sum(sizes.get(n, 0) for n in set(node.input) if last_use.get(n) == i and n not in weights)
    return peak


def _shape_probe(proto: onnx.ModelProto, size: tuple[int, int, int]) -> onnx.ModelProto:
    """The graph of ``proto`` with its image input fixed to (1, *size), for shape inference: weights above 1 KiB
    become typed graph inputs (their shapes are all inference needs; small ones, such as Reshape targets, keep
    their values), so the copy stays small even for a 2 GB model. No recorded intermediate shapes."""
    graph = proto.graph
    weights = {t.name for t in graph.initializer}
    given = next(i for i in graph.input if i.name not in weights)
    image = helper.make_tensor_value_info(given.name, given.type.tensor_type.elem_type, [1, *size])
    small = [t for t in graph.initializer if _bytes(t.data_type, t.dims) <= 1024]
    big = [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in graph.initializer
           if _bytes(t.data_type, t.dims) > 1024]
    probe = helper.make_model(helper.make_graph(graph.node, graph.name, [image, *big], graph.output, small),
                              opset_imports=proto.opset_import, ir_version=proto.ir_version)
    probe.functions.extend(proto.functions)
    return probe


def _bytes(elem_type: int, dims) -> int:
    """Bytes of a tensor of ``dims`` (0 for an unknown dimension or element type: the estimate is a lower bound)."""
    try:
        itemsize = helper.tensor_dtype_to_np_dtype(elem_type).itemsize
    except (KeyError, ValueError, TypeError):
        return 0
    return itemsize * math.prod(int(d) for d in dims)


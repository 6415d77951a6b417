"""Recording fakes of the ``tensorrt`` (10.x, 11.x) and ``modelopt`` Python modules, for contract tests.

They build and run nothing: they check that the code calls the API as the real bindings define
it and record what it calls. Each class takes exactly the parameters of the real pybind11
binding (names, order, defaults), so a call the real module would reject with TypeError fails
here too, and an enum member or method exists only in the versions that have it. Sources
(NVIDIA/TensorRT at release/10.0, v10.16 and v11.1):

- python/src/infer/pyCore.cpp: ``Logger(min_severity=Severity.WARNING)``, ``Builder(logger)``,
  ``create_network(flags=0)``, ``create_builder_config()``, ``create_optimization_profile()``,
  ``build_serialized_network(network, config)``; IBuilderConfig ``set_memory_pool_limit(pool,
  pool_size)``, ``set_flag(flag)``, ``clear_flag(flag)``, ``get_flag(flag)``,
  ``add_optimization_profile(profile)``, ``create_timing_cache(serialized_timing_cache)``,
  ``set_timing_cache(cache, ignore_mismatch) -> bool`` (False for a cache from another device),
  ``get_timing_cache()`` (None when none is set); ``ITimingCache.serialize()``;
  ``IOptimizationProfile.set_shape(input, min, opt, max)``; ``Runtime(logger)``,
  ``deserialize_cuda_engine(serialized_engine)``; ICudaEngine ``num_io_tensors``,
  ``get_tensor_name(index)``, ``get_tensor_mode(name)``, ``get_tensor_dtype(name)``,
  ``get_tensor_shape(name)``, ``get_tensor_profile_shape(name, profile_index)``,
  ``create_execution_context(strategy=ExecutionContextAllocationStrategy.STATIC)``;
  IExecutionContext ``set_input_shape(name, shape) -> bool``, ``get_tensor_shape(name)``,
  ``set_tensor_address(name, memory) -> bool``, ``execute_async_v3(stream_handle) -> bool``.
  Enums: BuilderFlag (11 drops FP16, INT8, BF16, OBEY_PRECISION_CONSTRAINTS, ...),
  NetworkDefinitionCreationFlag (11 drops EXPLICIT_BATCH), MemoryPoolType, TensorIOMode.
- python/src/infer/pyGraph.cpp: INetworkDefinition ``num_layers``, ``get_layer(index)``,
  ``num_inputs``/``get_input(index)``, ``num_outputs``/``get_output(index)``; ILayer ``name``,
  ``metadata``, ``num_outputs``, ``get_output(index)``, and in 10 only ``precision`` and
  ``set_output_type(index, dtype)``; ITensor ``name``, ``dtype``.
- python/src/infer/pyFoundationalTypes.cpp: DataType and the aliases ``float32``, ``float16``, ...
- python/src/parsers/pyOnnx.cpp: ``OnnxParser(network, logger)``, ``parse_from_file(model)``,
  ``num_errors``, ``get_error(index)``.
- include/NvInfer.h, NvInferRuntimeBase.h: enum values (``STRONGLY_TYPED`` is 1 in 10.x; 0,
  deprecated and ignored in 11).

The fake parser names layers as onnx-tensorrt 10.x does (``ImporterContext::registerLayer``,
``generateUniqueName`` in weightUtils.cpp, ``processMetadata`` and ``getNodeName`` in
importerUtils.cpp): a node's layers are called ``getNodeName(node)`` (its name, or
``node_of_<first output>``), then ``<name>_<k>`` with one counter for all names, each with the
metadata ``[ONNX Layer: <name>]``; helper layers for no node are ``ONNXTRT_*`` without
metadata (here an ``ONNXTRT_Broadcast`` shuffle before each elementwise op, as
``broadcastTensor`` in importerUtils.cpp adds for a lower-rank operand). How many layers a node
becomes is the test's choice (``layers_per_op``), not the real importers'.

The ModelOpt fake follows ``modelopt.onnx.autocast.convert_to_mixed_precision`` of
NVIDIA/Model-Optimizer 0.33.0 (modelopt/onnx/autocast/convert.py; releases before 0.33 export
``convert`` instead) and its node selection (``re.match`` of ``nodes_to_exclude`` on node
names, ``op_types_to_exclude``); its result carries only the types (value_info) of a converted
model: low-precision outputs FLOAT16/BFLOAT16, kept ones FLOAT.
"""
from __future__ import annotations

import enum
import re
import sys
import types

import onnx

DataType = enum.IntEnum("DataType", {"FLOAT": 0, "HALF": 1, "INT8": 2, "INT32": 3, "BOOL": 4, "UINT8": 5,
                                     "FP8": 6, "BF16": 7, "INT64": 8, "INT4": 9})
_ONNX_TO_TRT = {onnx.TensorProto.FLOAT: DataType.FLOAT, onnx.TensorProto.FLOAT16: DataType.HALF,
                onnx.TensorProto.BFLOAT16: DataType.BF16, onnx.TensorProto.INT8: DataType.INT8,
                onnx.TensorProto.INT32: DataType.INT32, onnx.TensorProto.INT64: DataType.INT64,
                onnx.TensorProto.BOOL: DataType.BOOL, onnx.TensorProto.UINT8: DataType.UINT8}
BUILDER_FLAGS_10 = {"FP16": 0, "INT8": 1, "DEBUG": 2, "GPU_FALLBACK": 3, "REFIT": 4, "DISABLE_TIMING_CACHE": 5,
                    "TF32": 6, "SPARSE_WEIGHTS": 7, "OBEY_PRECISION_CONSTRAINTS": 9,
                    "PREFER_PRECISION_CONSTRAINTS": 10, "FP8": 15, "BF16": 17}
BUILDER_FLAGS_11 = {"DEBUG": 2, "GPU_FALLBACK": 3, "REFIT": 4, "DISABLE_TIMING_CACHE": 5, "TF32": 6,
                    "SPARSE_WEIGHTS": 7}
NETWORK_FLAGS_10 = {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1}
NETWORK_FLAGS_11 = {"STRONGLY_TYPED": 0}
FOREIGN_CACHE = b"cache-of-another-gpu"  # timing-cache bytes set_timing_cache(ignore_mismatch=False) refuses


class State:
    """What a test configures and reads back: ``calls`` is every recorded call, in order."""

    def __init__(self, version: str, layers_per_op: dict[str, int] | None, metadata: bool, plan: bytes | None,
                 engine_io: list[tuple[str, str, DataType, tuple[int, ...]]]):
        self.version, self.major = version, int(version.split(".")[0])
        self.layers_per_op, self.metadata, self.plan, self.engine_io = layers_per_op or {}, metadata, plan, engine_io
        self.calls: list[tuple] = []
        self.networks: list[INetworkDefinition] = []

    def record(self, *call) -> None:
        self.calls.append(call)

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]


class ITensor:
    def __init__(self, name: str, dtype: DataType):
        self.name, self.dtype = name, dtype


class ILayer:
    """TensorRT 11: no ``precision`` / ``set_output_type`` (strong typing only)."""

    def __init__(self, name: str, metadata: str, outputs: list[ITensor]):
        self.name, self.metadata, self._outputs = name, metadata, outputs

    @property
    def num_outputs(self) -> int:
        return len(self._outputs)

    def get_output(self, index):
        return self._outputs[index]


class ILayer10(ILayer):
    """TensorRT 10: precision constraints of weakly typed networks."""

    def __init__(self, state: State, *args):
        super().__init__(*args)
        self._state, self._precision, self.output_types = state, DataType.FLOAT, {}

    @property
    def precision(self):
        return self._precision

    @precision.setter
    def precision(self, dtype):
        self._state.record("layer.precision", self.name, dtype)
        self._precision = dtype

    def set_output_type(self, index, dtype):
        self._state.record("layer.set_output_type", self.name, index, dtype)
        self.output_types[index] = dtype


class INetworkDefinition:
    def __init__(self, flags: int):
        self.flags, self.layers, self.inputs, self.outputs = flags, [], [], []

    num_layers = property(lambda self: len(self.layers))
    num_inputs = property(lambda self: len(self.inputs))
    num_outputs = property(lambda self: len(self.outputs))

    def get_layer(self, index):
        return self.layers[index]

    def get_input(self, index):
        return self.inputs[index]

    def get_output(self, index):
        return self.outputs[index]


class ITimingCache:
    def __init__(self, data: bytes):
        self.data = data

    def serialize(self):
        return b"timing-cache-of-this-gpu"


class IOptimizationProfile:
    def __init__(self, state: State):
        self._state = state

    def set_shape(self, input, min, opt, max):  # the binding's argument names
        self._state.record("set_shape", input, tuple(min), tuple(opt), tuple(max))


class IBuilderConfig:
    def __init__(self, state: State):
        self._state, self._flags, self._cache = state, set(), None
        self._flags.add(state.module.BuilderFlag.TF32)  # on by default

    def set_memory_pool_limit(self, pool, pool_size):
        self._state.record("set_memory_pool_limit", pool, pool_size)

    def set_flag(self, flag):
        self._state.record("set_flag", flag.name)
        self._flags.add(flag)

    def clear_flag(self, flag):
        self._state.record("clear_flag", flag.name)
        self._flags.discard(flag)

    def get_flag(self, flag):
        return flag in self._flags

    def add_optimization_profile(self, profile):
        self._state.record("add_optimization_profile")
        return 0

    def create_timing_cache(self, serialized_timing_cache):
        self._state.record("create_timing_cache", bytes(serialized_timing_cache))
        return ITimingCache(bytes(serialized_timing_cache))

    def set_timing_cache(self, cache, ignore_mismatch):
        accepted = ignore_mismatch or cache.data != FOREIGN_CACHE
        self._state.record("set_timing_cache", cache.data, ignore_mismatch, accepted)
        if accepted:
            self._cache = cache
        return accepted

    def get_timing_cache(self):
        return self._cache


class _Builder:
    _state: State

    def __init__(self, logger):
        self._state.record("Builder")

    def create_network(self, flags=0):
        self._state.record("create_network", flags)
        network = INetworkDefinition(flags)
        self._state.networks.append(network)
        return network

    def create_builder_config(self):
        return IBuilderConfig(self._state)

    def create_optimization_profile(self):
        return IOptimizationProfile(self._state)

    def build_serialized_network(self, network, config):
        self._state.record("build_serialized_network", sorted(f.name for f in config._flags))
        return self._state.plan


def _unique(taken: set[str], counter: list[int], base: str) -> str:
    """onnx-tensorrt's generateUniqueName: ``base``, else ``base_<counter>`` (one counter for all names)."""
    candidate = base
    while candidate in taken:
        candidate = f"{base}_{counter[0]}"
        counter[0] += 1
    taken.add(candidate)
    return candidate


class _OnnxParser:
    _state: State

    def __init__(self, network, logger):
        self.network = network

    num_errors = property(lambda self: 0)

    def get_error(self, index):
        raise IndexError(index)

    def parse_from_file(self, model):
        self._state.record("parse_from_file", model)
        proto = onnx.shape_inference.infer_shapes(onnx.load(model, load_external_data=False))
        g = proto.graph
        types_ = {v.name: _ONNX_TO_TRT.get(v.type.tensor_type.elem_type, DataType.FLOAT)
                  for v in [*g.input, *g.output, *g.value_info]}
        taken, counter = set(), [0]
        layer = ILayer10 if self._state.major < 11 else ILayer
        extra = (self._state,) if self._state.major < 11 else ()
        for node in g.node:
            if node.op_type == "Constant":  # the parser makes no layer for a Constant node
                continue
            node_name = node.name or f"node_of_{node.output[0]}"
            if node.op_type in ("Add", "Sub", "Mul", "Div"):  # the rank-broadcast shuffle, registered for no node
                self.network.layers.append(layer(*extra, _unique(taken, counter, "ONNXTRT_Broadcast"), "",
                                                 [ITensor("broadcast", DataType.FLOAT)]))
            for _ in range(self._state.layers_per_op.get(node.op_type, 1)):
                meta = f"[ONNX Layer: {node_name}]" if self._state.metadata else ""
                outs = [ITensor(o, types_.get(o, DataType.FLOAT)) for o in node.output]
                self.network.layers.append(layer(*extra, _unique(taken, counter, node_name), meta, outs))
        return True


class ICudaEngine:
    def __init__(self, io: list[tuple[str, str, DataType, tuple[int, ...]]], mode_enum):
        self._io = {name: (mode_enum[mode], dtype, shape) for name, mode, dtype, shape in io}
        self._names = [name for name, *_ in io]

    num_io_tensors = property(lambda self: len(self._names))

    def get_tensor_name(self, index):
        return self._names[index]

    def get_tensor_mode(self, name):
        return self._io[name][0]

    def get_tensor_dtype(self, name):
        return self._io[name][1]

    def get_tensor_shape(self, name):
        return self._io[name][2]

    def get_tensor_profile_shape(self, name, profile_index):
        shape = self._io[name][2]
        return [(b, *shape[1:]) for b in (1, 4, 8)]

    def create_execution_context(self, strategy=0):  # 0: ExecutionContextAllocationStrategy.STATIC
        return IExecutionContext(self)


class IExecutionContext:
    """Output shapes follow the input's batch; ``execute_async_v3`` fails while an I/O tensor has no address."""

    def __init__(self, engine: ICudaEngine):
        self._engine, self.batch, self.addresses, self.calls = engine, None, {}, []

    def set_input_shape(self, name, shape):
        self.calls.append(("set_input_shape", name, tuple(shape)))
        self.batch = shape[0]
        return True

    def get_tensor_shape(self, name):
        return (self.batch, *self._engine.get_tensor_shape(name)[1:])

    def set_tensor_address(self, name, memory):
        self.calls.append(("set_tensor_address", name, memory))
        self.addresses[name] = memory
        return name in self._engine._io

    def execute_async_v3(self, stream_handle):
        self.calls.append(("execute_async_v3", stream_handle))
        return set(self.addresses) == set(self._engine._names)


class _Runtime:
    _state: State

    def __init__(self, logger):
        pass

    def deserialize_cuda_engine(self, serialized_engine):
        return ICudaEngine(self._state.engine_io, self._state.module.TensorIOMode)


class Logger:
    Severity = enum.IntEnum("Severity", {"INTERNAL_ERROR": 0, "ERROR": 1, "WARNING": 2, "INFO": 3, "VERBOSE": 4})
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = Severity

    def __init__(self, min_severity=Severity.WARNING):
        self.min_severity = min_severity


def make_tensorrt(version: str, *, layers_per_op: dict[str, int] | None = None, metadata: bool = True,
                  plan: bytes | None = b"fake-plan",
                  engine_io: list[tuple[str, str, DataType, tuple[int, ...]]] = ()) -> types.ModuleType:
    """A ``tensorrt`` module of ``version`` (10.x or 11.x API; the state is ``module.state``).

    engine_io: the I/O tensors (name, "INPUT"/"OUTPUT", DataType, shape with batch -1) of the
    engine ``Runtime.deserialize_cuda_engine`` returns.
    """
    state = State(version, layers_per_op, metadata, plan, list(engine_io))
    eleven = state.major >= 11
    m = types.ModuleType("tensorrt")
    m.__version__, m.state, m.DataType, m.Logger = version, state, DataType, Logger
    for alias, member in (("float32", "FLOAT"), ("float16", "HALF"), ("bfloat16", "BF16"), ("int8", "INT8"),
                          ("int32", "INT32"), ("int64", "INT64"), ("bool", "BOOL"), ("uint8", "UINT8")):
        setattr(m, alias, DataType[member])
    m.BuilderFlag = enum.IntEnum("BuilderFlag", BUILDER_FLAGS_11 if eleven else BUILDER_FLAGS_10)
    m.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag",
                                                   NETWORK_FLAGS_11 if eleven else NETWORK_FLAGS_10)
    m.MemoryPoolType = enum.IntEnum("MemoryPoolType", {"WORKSPACE": 0})
    m.TensorIOMode = enum.IntEnum("TensorIOMode", {"NONE": 0, "INPUT": 1, "OUTPUT": 2})
    m.ExecutionContextAllocationStrategy = enum.IntEnum("ExecutionContextAllocationStrategy", {"STATIC": 0})
    m.Builder = type("Builder", (_Builder,), {"_state": state})
    m.OnnxParser = type("OnnxParser", (_OnnxParser,), {"_state": state})
    m.Runtime = type("Runtime", (_Runtime,), {"_state": state})
    state.module = m
    return m


def make_modelopt(version: str = "0.33.0", *, own_fp32: tuple[str, ...] = ()) -> dict[str, types.ModuleType]:
    """``modelopt``, ``modelopt.onnx`` and ``modelopt.onnx.autocast`` for ``sys.modules``.

    own_fp32: nodes the fake AutoCast keeps in FP32 on its own (as its data/init range rules do).
    ``calls`` on the autocast module records each conversion's keyword arguments.
    """
    top, sub, autocast = (types.ModuleType(n) for n in ("modelopt", "modelopt.onnx", "modelopt.onnx.autocast"))
    top.__version__, top.onnx, sub.autocast = version, sub, autocast
    autocast.calls = []

    def convert_to_mixed_precision(onnx_path, low_precision_type="fp16", nodes_to_exclude=None,
                                   op_types_to_exclude=None, data_max=512, init_max=65504.0, keep_io_types=False,
                                   calibration_data=None, custom_rule=None, init_conversion_max_bytes=None,
                                   providers=("cpu",), trt_plugins=(), max_depth_of_reduction=None):
        autocast.calls.append({"onnx_path": onnx_path, "low_precision_type": low_precision_type,
                               "nodes_to_exclude": nodes_to_exclude, "op_types_to_exclude": op_types_to_exclude,
                               "keep_io_types": keep_io_types})
        model = onnx.shape_inference.infer_shapes(onnx.load(onnx_path))
        g = model.graph
        low = onnx.TensorProto.FLOAT16 if low_precision_type == "fp16" else onnx.TensorProto.BFLOAT16
        kept = {n.name for n in g.node if n.name in own_fp32 or n.op_type in (op_types_to_exclude or [])
                or any(re.match(p, n.name) for p in nodes_to_exclude or [])}
        low_tensors = {o for n in g.node if n.name not in kept for o in n.output}
        for vi in g.value_info:
            if vi.name in low_tensors and vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
                vi.type.tensor_type.elem_type = low
        for out in g.output:  # keep_io_types: a Cast back to FP32 after a low-precision producer
            producer = next((n for n in g.node if out.name in n.output), None)
            if keep_io_types and producer is not None and producer.name not in kept:
                inner = f"{out.name}_low"
                producer.output[list(producer.output).index(out.name)] = inner
                g.value_info.append(onnx.helper.make_tensor_value_info(inner, low, None))
                g.node.append(onnx.helper.make_node("Cast", [inner], [out.name], name=f"{out.name}_cast_to_fp32",
                                                    to=onnx.TensorProto.FLOAT))
        return model

    if tuple(int(p) for p in version.split(".")[:2]) >= (0, 33):
        autocast.convert_to_mixed_precision = convert_to_mixed_precision
    else:
        autocast.convert = convert_to_mixed_precision
    return {"modelopt": top, "modelopt.onnx": sub, "modelopt.onnx.autocast": autocast}


def install(monkeypatch, trt: types.ModuleType | None, modelopt: dict[str, types.ModuleType] | None = None) -> None:
    """Put the fakes into ``sys.modules`` for one test (None: the module is missing, its import fails)."""
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    for name in ("modelopt", "modelopt.onnx", "modelopt.onnx.autocast"):
        monkeypatch.setitem(sys.modules, name, (modelopt or {}).get(name))

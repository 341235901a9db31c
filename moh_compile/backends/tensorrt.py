"""TensorRT side of the custom ONNX form: plugin shape/type logic and the engine build.

TensorRT cannot be installed on the machines this was written on (docs/deploy.md), so:
- the logic a plugin must implement about shapes and types (IPluginV3's getOutputShapes,
  getOutputDataTypes, supportsFormatCombination) is written here as plain Python functions
  of plain values, and tested; a plugin (C++ IPluginV3 or tensorrt.plugin) calls into the
  same rules;
- `build_engine` imports tensorrt lazily and fails with exactly TENSORRT_MISSING without it.
The parser maps a custom node to a plugin creator by op_type (+ plugin_version /
plugin_namespace attributes), which the custom form writes on every node.
"""
from __future__ import annotations

import os
import tempfile

from moh_compile.backends.onnx_custom import ATTENTION_OP, FFN_OP, PLUGIN_NAMESPACE, PLUGIN_VERSION
from moh_compile.errors import MohCompileError

MOEPP_OP = "MohMoEppFFN"  # onnx_moepp.MOEPP_OP (not imported: that module needs the MoE++ op)
PLUGIN_OPS = (ATTENTION_OP, FFN_OP, MOEPP_OP)
TENSORRT_MISSING = ("TensorRT is not installed (import tensorrt failed): --export tensorrt needs the tensorrt "
                    "Python package (>= 10.6) with its ONNX parser; export the custom ONNX form with --export onnx "
                    "and build the engine on a machine that has TensorRT")

FLOATS = ("float32", "float16", "bfloat16")
INDEX = ("int32", "int64")

# Input ports per plugin, in ONNX input order: (name, kind, optional); kind T = the float type,
# M = mask (bool or T), I = expert index.
PORTS = {
    ATTENTION_OP: [("x", "T", False), ("q_weight", "T", True), ("q_bias", "T", True), ("k", "T", False),
                   ("v", "T", False), ("attn_mask", "M", True), ("rope_cos", "T", True), ("rope_sin", "T", True),
                   ("o_weight", "T", False), ("o_bias", "T", True), ("head_gates", "T", True),
                   ("q_norm_weight", "T", True), ("sinks", "T", True), ("query", "T", True),
                   ("out_gate", "T", True)],
    FFN_OP: [("x", "T", False), ("w_in", "T", False), ("b_in", "T", True), ("w_out", "T", False),
             ("b_out", "T", True), ("w_gate", "T", True), ("b_gate", "T", True)],
    MOEPP_OP: [("x", "T", False), ("w_in", "T", False), ("b_in", "T", True), ("w_gate", "T", True),
               ("b_gate", "T", True), ("w_out", "T", False), ("b_out", "T", True), ("expert_idx", "I", False),
               ("expert_weight", "T", False), ("const_vectors", "T", True), ("const_gate_weight", "T", True)],
}


def _ports(op_type: str):
    if op_type not in PORTS:
        raise ValueError(f"no TensorRT plugin for op type {op_type!r} (known: {', '.join(PLUGIN_OPS)})")
    return PORTS[op_type]


def _bind(op_type: str, values: dict) -> dict:
    unknown = set(values) - {p[0] for p in _ports(op_type)}
    if unknown:
        raise ValueError(f"{op_type}: unknown inputs {sorted(unknown)}")
    missing = [p[0] for p in _ports(op_type) if not p[2] and values.get(p[0]) is None]
    if missing:
        raise ValueError(f"{op_type}: required inputs missing: {missing}")
    return values


def _same(a, b) -> bool:
    """Dims compare equal when both are known ints; symbolic dims (str/None) are trusted."""
    return not (isinstance(a, int) and isinstance(b, int)) or a == b


def output_shape(op_type: str, shapes: dict, attrs: dict) -> tuple:
    """Output dims of one plugin node from its input dims (ints, or str/None for symbolic).

    Mirrors getOutputShapes: y = x's dims with the last replaced by the output width, plus the
    consistency checks a plugin must make at build time (ValueError when they fail)."""
    s = _bind(op_type, shapes)
    x = tuple(s["x"])
    if op_type == ATTENTION_OP:
        h, hkv, d = int(attrs["num_heads"]), int(attrs["num_kv_heads"]), int(attrs["head_dim"])
        dv = int(attrs.get("v_head_dim", d))  # values narrower than queries/keys: DeepSeek's MLA
        if len(x) != 3 or len(s["k"]) != 4 or len(s["v"]) != 4:
            raise ValueError(f"{op_type}: x must be (B, S, E) and k, v (B, Hkv, S_k, D)")
        if h % hkv:
            raise ValueError(f"{op_type}: num_heads {h} is not a multiple of num_kv_heads {hkv}")
        if (s.get("q_weight") is None) == (s.get("query") is None):
            raise ValueError(f"{op_type}: needs exactly one of q_weight (the op projects the queries) and query "
                             "(the graph computed them)")
        if s.get("query") is not None:
            qs = tuple(s["query"])
            if not (len(qs) == 4 and _same(qs[0], x[0]) and _same(qs[1], h) and _same(qs[2], x[1])
                    and _same(qs[3], d)):
                raise ValueError(f"{op_type}: query {qs} != (B, {h}, S, {d})")
        elif not (_same(s["q_weight"][0], h * d) and _same(s["q_weight"][1], x[2])):
            raise ValueError(f"{op_type}: q_weight {tuple(s['q_weight'])} != (num_heads*head_dim={h * d}, E={x[2]})")
        for name, width in (("k", d), ("v", dv)):
            if not (_same(s[name][1], hkv) and _same(s[name][3], width) and _same(s[name][0], x[0])):
                raise ValueError(f"{op_type}: {name} {tuple(s[name])} != (B, {hkv}, S_k, {width})")
        if not _same(s["o_weight"][1], h * dv):
            raise ValueError(f"{op_type}: o_weight {tuple(s['o_weight'])} must have {h * dv} input columns")
        if s.get("head_gates") is not None and not (_same(s["head_gates"][-1], h) and len(s["head_gates"]) == 3):
            raise ValueError(f"{op_type}: head_gates {tuple(s['head_gates'])} != (B, S, {h})")
        if s.get("q_norm_weight") is not None and tuple(s["q_norm_weight"]) not in ((d,), (None,)):
            raise ValueError(f"{op_type}: q_norm_weight {tuple(s['q_norm_weight'])} != ({d},) (one scale per head dim)")
        if s.get("out_gate") is not None and not (len(s["out_gate"]) == 4 and _same(s["out_gate"][0], x[0])
                                                  and _same(s["out_gate"][1], h) and _same(s["out_gate"][2], x[1])
                                                  and _same(s["out_gate"][3], dv)):
            raise ValueError(f"{op_type}: out_gate {tuple(s['out_gate'])} != (B, {h}, S, {dv})")
        if s.get("sinks") is not None and not (len(s["sinks"]) == 1 and _same(s["sinks"][0], h)):
            raise ValueError(f"{op_type}: sinks {tuple(s['sinks'])} != ({h},) (one logit per query head)")
        for name in ("window_sink", "window_alpha", "window_beta"):
            if name in attrs and len(attrs[name]) != h:
                raise ValueError(f"{op_type}: {name} has {len(attrs[name])} entries for {h} heads")
        return x[:-1] + (s["o_weight"][0],)
    if op_type == FFN_OP:
        f = s["w_in"][0]
        if not (_same(s["w_in"][1], x[-1]) and _same(s["w_out"][1], f)):
            raise ValueError(f"{op_type}: w_in {tuple(s['w_in'])} / w_out {tuple(s['w_out'])} do not chain from x {x}")
        if s.get("w_gate") is not None and tuple(s["w_gate"]) != tuple(s["w_in"]):
            raise ValueError(f"{op_type}: w_gate {tuple(s['w_gate'])} != w_in {tuple(s['w_in'])}")
        return x[:-1] + (s["w_out"][0],)
    n, f_e, d = s["w_in"]
    if not (_same(d, x[-1]) and _same(s["w_out"][0], n) and _same(s["w_out"][2], f_e)):
        raise ValueError(f"{op_type}: w_in {tuple(s['w_in'])} / w_out {tuple(s['w_out'])} do not match x {x}")
    idx = tuple(s["expert_idx"])
    if len(idx) != len(x) or not all(_same(a, b) for a, b in zip(idx[:-1], x[:-1])) \
            or tuple(s["expert_weight"]) != idx:
        raise ValueError(f"{op_type}: expert_idx {idx} / expert_weight must be (*x.shape[:-1], k)")
    if "top_k" in attrs and not _same(idx[-1], int(attrs["top_k"])):
        raise ValueError(f"{op_type}: expert_idx has k={idx[-1]} but top_k={attrs['top_k']}")
    return x[:-1] + (s["w_out"][1],)


def output_dtype(op_type: str, dtypes: dict) -> str:
    """getOutputDataTypes: y has x's float type."""
    t = _bind(op_type, dtypes)["x"]
    if t not in FLOATS:
        raise ValueError(f"{op_type}: x must be one of {FLOATS}, got {t}")
    return t


def supports_combination(op_type: str, dtypes: dict) -> bool:
    """supportsFormatCombination (linear layout): every T input shares x's float type, the mask
    is bool or that type, expert indices int32/int64; absent optional inputs are skipped."""
    try:
        _bind(op_type, dtypes)
    except ValueError:
        return False
    t = dtypes["x"]
    if t not in FLOATS:
        return False
    for name, kind, _ in _ports(op_type):
        got = dtypes.get(name)
        if got is None:
            continue
        ok = {"T": got == t, "M": got in ("bool", t), "I": got in INDEX}[kind]
        if not ok:
            return False
    return True


def require_tensorrt():
    """Import tensorrt lazily; MohCompileError(TENSORRT_MISSING) when it is absent or broken."""
    try:
        import tensorrt
    except (ImportError, OSError):
        raise MohCompileError(TENSORRT_MISSING) from None
    return tensorrt


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, profile: dict[str, tuple],
                 fp16: bool = False, workspace_bytes: int = 4 << 30) -> str:
    """Build a serialized engine from a custom-form ONNX file (never run here: no TensorRT).

    profile: {input name: (min_shape, opt_shape, max_shape)} for the dynamic batch/seq dims.
    The three plugin creators (PLUGIN_OPS, version PLUGIN_VERSION, namespace PLUGIN_NAMESPACE)
    must already be registered with TensorRT (a plugin library loaded); missing ones are named.
    """
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    registry = trt.get_plugin_registry()
    missing = [op for op in PLUGIN_OPS
               if registry.get_creator(op, PLUGIN_VERSION, PLUGIN_NAMESPACE) is None]
    if missing:
        raise MohCompileError(f"TensorRT has no plugin creator for {', '.join(missing)} "
                              f"(version {PLUGIN_VERSION}, namespace {PLUGIN_NAMESPACE}); load the plugin library first")
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(os.fspath(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise MohCompileError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    opt = builder.create_optimization_profile()
    for name, (lo, mid, hi) in profile.items():
        opt.set_shape(name, lo, mid, hi)
    config.add_optimization_profile(opt)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise MohCompileError(f"TensorRT failed to build an engine from {onnx_path}")
    engine_path = os.fspath(engine_path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".engine", dir=os.path.dirname(os.path.abspath(engine_path)))
    with os.fdopen(fd, "wb") as fh:
        fh.write(bytes(engine))
    os.replace(tmp, engine_path)
    return engine_path


def default_profile(onnx_path: str | os.PathLike, batch=(1, 8, 64), seq=(1, 128, 512)) -> dict[str, tuple]:
    """Optimization profile for an exported file: first symbolic dim of each input = batch, others = seq."""
    import onnx

    model = onnx.load(os.fspath(onnx_path), load_external_data=False)
    profile = {}
    for inp in model.graph.input:
        dims, first = [[], [], []], True
        for d in inp.type.tensor_type.shape.dim:
            static = d.dim_value or (int(d.dim_param) if d.dim_param.isdigit() else 0)  # exporter writes "64"
            if static:
                choice = (static,) * 3
            else:
                choice, first = (batch if first else seq), False
            for i in range(3):
                dims[i].append(choice[i])
        profile[inp.name] = tuple(tuple(x) for x in dims)
    return profile

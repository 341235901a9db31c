"""The identity rewrite computes exactly what the original model did (the foundation of every pass)."""
import pytest
import torch

import moh_compile
from tests.models import ALL, build, main_output, reshape_inputs


def _run(m, inputs):
    with torch.no_grad():
        return main_output(m(**inputs) if isinstance(inputs, dict) else m(*inputs))


@pytest.mark.parametrize("name", ALL)
def test_identity_rewrite_matches_original_at_two_shapes(name):
    model, inputs, (n_attn, n_ffn), _ = build(name)
    compiled = moh_compile.compile(model, inputs)
    ops = [n.target for n in compiled.graph_module.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.moh_compile.attention.default) == n_attn
    assert ops.count(torch.ops.moh_compile.ffn.default) == n_ffn
    assert not any(n.target == torch.ops.aten.scaled_dot_product_attention.default
                   for n in compiled.graph_module.graph.nodes)
    for batch, seq in ((3, 5), (2, 13)):
        x = reshape_inputs(inputs, batch, seq)
        ref, got = _run(model, x), _run(compiled, x)
        assert got.shape == ref.shape
        assert (got - ref).abs().max().item() <= 1e-5


def test_a_capture_is_reused_bound_to_the_model_given():
    """compile(..., captured=c): the graph of c, the weights of the model passed (shared, as a fresh
    capture's are), c itself untouched; a capture of another architecture is refused in one line."""
    source, inputs, _, _ = build("llama")
    capture = moh_compile.capture(source, inputs)
    nodes_before = len(capture.module.graph.nodes)
    other, _, _, _ = build("llama")
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)  # same architecture, other weights: the reused graph must read these
    compiled = moh_compile.compile(other, inputs, moh_compile.CompileConfig(attention="moh", ffn="moepp", options={
        "moh": {"active_heads": 1.0, "router": "query_norm"}, "moepp": {"experts": 4, "ffn_keep": 1.0}}),
        captured=capture)
    fresh = moh_compile.compile(other, inputs)
    x = reshape_inputs(inputs, 2, 9)
    assert (_run(compiled, x) - _run(other, x)).abs().max().item() <= 1e-5
    assert (_run(fresh, x) - _run(other, x)).abs().max().item() <= 1e-5
    assert (_run(other, x) - _run(source, x)).abs().max().item() > 1e-2
    ours = {id(p) for p in other.parameters()}
    embed = dict(compiled.graph_module.named_parameters())["embed_tokens.weight"]
    assert id(embed) in ours and not any(id(p) in ours for p in capture.module.parameters())
    assert len(capture.module.graph.nodes) == nodes_before  # compile rewrote a copy
    wrong, _, _, _ = build("gpt2")
    with pytest.raises(moh_compile.MohCompileError, match="this capture is not of this model"):
        moh_compile.compile(wrong, inputs, captured=capture)


def test_compiled_model_reexports_and_trains():
    model, inputs, _, _ = build("llama")
    compiled = moh_compile.compile(model, inputs)
    program = compiled.export()
    targets = {n.target for n in program.graph.nodes if n.op == "call_function"}
    assert torch.ops.moh_compile.attention.default in targets
    x = reshape_inputs(inputs, 2, 7)
    ref = _run(model, x)
    assert (main_output(program.module()(**x)) - ref).abs().max().item() <= 1e-5
    loss = main_output(compiled(**x)).pow(2).mean()
    loss.backward()
    grads = [p.grad for p in compiled.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_keep_leaves_blocks_alone():
    model, inputs, _, _ = build("bert")
    compiled = moh_compile.compile(model, inputs, moh_compile.CompileConfig(attention="keep", ffn="identity"))
    targets = [n.target for n in compiled.graph_module.graph.nodes]
    assert torch.ops.moh_compile.attention.default not in targets
    assert targets.count(torch.ops.moh_compile.ffn.default) == 2


def test_plan_round_trips_and_reapplies():
    model, inputs, _, _ = build("bert")
    compiled = moh_compile.compile(model, inputs)
    plan = moh_compile.Plan.from_json(compiled.plan.to_json())
    assert [b.transform for b in plan.blocks] == ["identity"] * 4
    plan.blocks[0].transform = "keep"
    again = moh_compile.compile(model, inputs, plan=plan)
    targets = [n.target for n in again.graph_module.graph.nodes]
    assert targets.count(torch.ops.moh_compile.attention.default) == 1


def test_half_precision_eager_attention_is_matched_and_verified():
    """HF eager attention in bfloat16 computes the softmax in float32 and casts back before P @ V
    (and export adds a metadata assert on the probabilities): the block is still found, verified
    at bfloat16's resolution, and the replaced softmax leaves the graph."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, use_cache=False,
                                   attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.LlamaModel(cfg).eval().to(torch.bfloat16)
    inputs = {"input_ids": torch.randint(0, 100, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    compiled = moh_compile.compile(model, inputs)
    nodes = [n.target for n in compiled.graph_module.graph.nodes if n.op == "call_function"]
    assert nodes.count(torch.ops.moh_compile.attention.default) == 1
    assert nodes.count(torch.ops.moh_compile.ffn.default) == 1
    assert torch.ops.aten.softmax.int not in nodes
    x = reshape_inputs(inputs, 3, 11)
    ref, got = _run(model, x).float(), _run(compiled, x).float()
    assert (got - ref).abs().max().item() <= torch.finfo(torch.bfloat16).eps * (1 + ref.abs().max().item())

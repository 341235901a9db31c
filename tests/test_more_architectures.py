"""More Hugging Face architectures, built from tiny configs: every block matched and the identity
compile exact at a new shape. (The model zoo in tests/models.py runs every pass on its models;
these check that matching carries over to the rest of the families users bring.)"""
import pytest
import torch

import moh_compile
from moh_compile.calibrate.data import Calibration
from tests.op_checks import dense_reference

transformers = pytest.importorskip("transformers")
T = transformers
COMMON = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128, vocab_size=100)
COMMON_VISION = {k: v for k, v in COMMON.items() if k != "vocab_size"}

CONFIGS = {
    "mistral": lambda: T.MistralModel(T.MistralConfig(**COMMON, num_key_value_heads=2)),
    "qwen2": lambda: T.Qwen2Model(T.Qwen2Config(**COMMON, num_key_value_heads=2)),
    # fused qkv and fused gate_up projections (the gated FFN's halves are row ranges of one weight)
    "phi3": lambda: T.Phi3Model(T.Phi3Config(**COMMON, num_key_value_heads=2, pad_token_id=0)),
    "gemma": lambda: T.GemmaModel(T.GemmaConfig(**COMMON, num_key_value_heads=1, head_dim=16)),
    # soft-capped scores (a small cap, so tanh bends them) and a sliding-window layer
    "gemma2": lambda: T.Gemma2Model(T.Gemma2Config(**COMMON, num_key_value_heads=2, head_dim=16,
                                                   attn_logit_softcapping=2.0, sliding_window=4)),
    "olmo": lambda: T.OlmoModel(T.OlmoConfig(**COMMON)),
    # query paths the op leaves to the graph (tests/test_query_from_graph.py): a norm over all heads
    # (OLMo 2), LayerNorm QK-norms (Cohere, StableLM, Persimmon: also a squared-ReLU FFN), a norm
    # after RoPE (HunYuan)
    "olmo2": lambda: T.Olmo2Model(T.Olmo2Config(**COMMON, num_key_value_heads=2)),
    "cohere": lambda: T.CohereModel(T.CohereConfig(**COMMON, num_key_value_heads=2, use_qk_norm=True)),
    "stablelm": lambda: T.StableLmModel(T.StableLmConfig(**COMMON, num_key_value_heads=2, qk_layernorm=True)),
    "persimmon": lambda: T.PersimmonModel(T.PersimmonConfig(**COMMON, qk_layernorm=True)),
    # MLA: low-rank query (left to the graph), keys written into slices, values narrower (tests/test_value_head_dim.py)
    "deepseek_v2": lambda: T.DeepseekV2Model(T.DeepseekV2Config(**COMMON, num_key_value_heads=4, q_lora_rank=32,
                                                                kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16,
                                                                v_head_dim=16, first_k_dense_replace=2)),
    # its full-attention layers: QK-norm and a sigmoid gate on the heads' contexts (tests/test_output_gate.py)
    "qwen3_next": lambda: _random_norm_scales(T.Qwen3NextModel(T.Qwen3NextConfig(
        **COMMON, num_key_value_heads=2, head_dim=16, layer_types=["full_attention"] * 2, num_experts=0,
        mlp_only_layers=[0, 1]))),
    "hunyuan": lambda: T.HunYuanDenseV1Model(T.HunYuanDenseV1Config(**COMMON, num_key_value_heads=2, head_dim=16)),
    # QK-norm with Gemma's (1 + w) scales, sliding-window and global layers (Qwen3 is in tests/models.py)
    "gemma3": lambda: _random_norm_scales(T.Gemma3TextModel(T.Gemma3TextConfig(**COMMON, num_key_value_heads=2,
                                                                              head_dim=16))),
    "starcoder2": lambda: T.Starcoder2Model(T.Starcoder2Config(**COMMON, num_key_value_heads=2)),
    "opt": lambda: T.OPTModel(T.OPTConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, ffn_dim=128,
                                          vocab_size=100, word_embed_proj_dim=64)),
    "gpt_bigcode": lambda: T.GPTBigCodeModel(T.GPTBigCodeConfig(n_layer=2, n_embd=64, n_head=4, vocab_size=100,
                                                                n_positions=64)),
    # ALiBi: Bloom adds it as baddbmm's input on (B*H, S, S) scores and a mask on a 4-D view;
    # MPT adds a (H, 1, S) bias, then masked_fill; Falcon folds it into SDPA's mask
    "bloom": lambda: T.BloomModel(T.BloomConfig(n_layer=2, hidden_size=64, n_head=4, vocab_size=100)),
    "mpt": lambda: T.MptModel(T.MptConfig(n_layers=2, d_model=64, n_heads=4, vocab_size=100)),
    "falcon_alibi": lambda: T.FalconModel(T.FalconConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                                         alibi=True, vocab_size=100)),
    "falcon_mqa": lambda: T.FalconModel(T.FalconConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                                       vocab_size=100)),
    # interleaved RoPE whose rotated copy is cast before the multiply
    "ernie4_5": lambda: T.Ernie4_5Model(T.Ernie4_5Config(**COMMON, num_key_value_heads=2)),
    # torch.where(causal, scores, finfo.min) fills, no 1/sqrt(d), a local-window layer
    "gpt_neo": lambda: T.GPTNeoModel(T.GPTNeoConfig(num_layers=2, hidden_size=64, num_heads=4, vocab_size=100,
                                                    attention_types=[[["global", "local"], 1]], window_size=8,
                                                    max_position_embeddings=64)),
    # scores scaled after the mask ((QK^T + mask) / sqrt(d)), fused qkv split in model-parallel groups
    "codegen": lambda: T.CodeGenModel(T.CodeGenConfig(n_layer=2, n_embd=64, n_head=4, vocab_size=100, rotary_dim=8,
                                                      n_positions=64, bos_token_id=0, eos_token_id=0)),
    "roberta": lambda: T.RobertaModel(T.RobertaConfig(**COMMON)),
    # relative position bias added in place (`scores += position_bias`): all-mpnet-base-v2's family
    "mpnet": lambda: T.MPNetModel(T.MPNetConfig(**COMMON)),
    # fused qkv unbound per head, RoPE on q.float(), sliding-window (local) and global layers
    "modernbert": lambda: T.ModernBertModel(T.ModernBertConfig(**COMMON, global_attn_every_n_layers=2,
                                                               local_attention=8, pad_token_id=0, bos_token_id=1,
                                                               eos_token_id=2, cls_token_id=1, sep_token_id=2)),
    "distilbert": lambda: T.DistilBertModel(T.DistilBertConfig(n_layers=2, dim=64, n_heads=4, hidden_dim=128,
                                                               vocab_size=100)),
    "electra": lambda: T.ElectraModel(T.ElectraConfig(**COMMON, embedding_size=64)),
    "clip_text": lambda: T.CLIPTextModel(T.CLIPTextConfig(**COMMON)),  # quick-GELU MLP
    # einsum-written relative attention (lower_einsum.py), sequence-first: the position term
    # (computed from the queries plus a second bias) is added to the scores as a mask, and the
    # query (plus its per-head bias) comes from the graph; XLNet adds a constant 0 segment term
    "xlnet": lambda: T.XLNetModel(T.XLNetConfig(vocab_size=100, d_model=64, n_layer=2, n_head=4, d_inner=128)),
    # Funnel: einsum position terms, a mask subtracted (scores - 1e6 (1 - mask)), the second
    # block's queries pooled to half the keys
    "funnel": lambda: T.FunnelBaseModel(T.FunnelConfig(vocab_size=100, d_model=64, n_head=4, d_head=16, d_inner=128,
                                                       block_sizes=[1, 1])),
    # disentangled attention: content-to-position and position-to-content terms added to the scores,
    # K^T scaled by a constant computed from a tensor before the product
    "deberta": lambda: T.DebertaModel(T.DebertaConfig(**COMMON, relative_attention=True, pos_att_type=["p2c", "c2p"],
                                                      max_relative_positions=16)),
    "deberta_v2": lambda: T.DebertaV2Model(T.DebertaV2Config(**COMMON, relative_attention=True,
                                                            pos_att_type=["p2c", "c2p"], max_relative_positions=16,
                                                            position_buckets=8)),
}
ENCODERS = {"roberta", "distilbert", "electra", "clip_text", "mpnet", "modernbert", "xlnet", "funnel", "deberta",
            "deberta_v2"}
# export specialises the sequence length (Funnel's pooling computes sizes in Python): checked at a
# new batch size, the traced length
TRACED_LENGTH_ONLY = {"funnel"}
# fused projections whose query rows the compile stops computing (passes/narrow_projections.py): Q, K, V
# (Qwen3-Next: Q and its output gate) in blocks, per head, per KV group and per model-parallel group
NARROWED = {"bloom", "codegen", "falcon_alibi", "falcon_mqa", "gpt_bigcode", "modernbert", "mpt", "phi3", "qwen3_next"}


def _random_norm_scales(model):
    """Norm scales start at 0 (Gemma: scale 1 + w); random ones make a misread scale show."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(p.numel()))
    return model


def _inputs(name, batch, seq):
    ids = torch.randint(0, 100, (batch, seq), generator=torch.Generator().manual_seed(batch * 100 + seq))
    return {"input_ids": ids} if name in ENCODERS else {"input_ids": ids, "use_cache": False}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_block_matched_and_identity_exact(name):
    torch.manual_seed(0)
    model = CONFIGS[name]().eval()
    compiled = moh_compile.compile(model, _inputs(name, 2, 8))
    ops = [n.target for n in compiled.graph_module.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.moh_compile.attention.default) == 2, compiled.report.skipped
    assert ops.count(torch.ops.moh_compile.ffn.default) == 2, compiled.report.skipped
    assert ("narrowed projections" in compiled.report.sections) == (name in NARROWED)
    x = _inputs(name, 3, 8 if name in TRACED_LENGTH_ONLY else 13)
    with torch.no_grad():
        want, got = model(**x).last_hidden_state, compiled(**x).last_hidden_state
    assert (got - want).abs().max().item() <= 1e-5


def _ids(b, s, seed):
    return {"input_ids": torch.randint(0, 100, (b, s), generator=torch.Generator().manual_seed(seed))}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["xlnet", "funnel", "deberta_v2"])
def test_relative_position_attention_routes_like_the_reference(name):
    """MoH at half the heads on attention with relative position terms (XLNet / Funnel: einsums;
    DeBERTa-v2: gathered c2p / p2c terms) equals the masked dense reference: the terms reach the
    op as an additive mask."""
    torch.manual_seed(0)
    model = CONFIGS[name]().eval()
    cfg = moh_compile.CompileConfig(attention="moh", ffn="keep", options={"moh": {"active_heads": 0.5}})
    compiled = moh_compile.compile(model, _ids(2, 8, 0), cfg,
                                   calibration=Calibration(batches=[_ids(4, 8, s) for s in range(3)]))
    blocks = [b for b in compiled.report.blocks if b["kind"] == "attention"]
    assert len(blocks) == 2 and all(b["has_mask"] for b in blocks)
    x = _ids(3, 8, 9)
    with torch.no_grad():
        got = compiled(**x).last_hidden_state
        assert (got - dense_reference(compiled)(**x).last_hidden_state).abs().max().item() <= 1e-5
        assert (got - model(**x).last_hidden_state).abs().max().item() > 1e-3


VISION = {
    # patch count (side // patch)^2 of symbolic image sides: the feature map's small stand-in sizes
    # give 0 patches, so it falls back to the traced sizes (this used to crash the compile);
    # 2 encoder layers + the attention-pooling head. (Swin, windowed, matches too but takes 76 s to
    # capture with symbolic image sides; its failure mode is tested in tests/test_rope_and_layouts.py.)
    "siglip": (lambda: T.SiglipVisionModel(T.SiglipVisionConfig(**COMMON_VISION, image_size=32, patch_size=8)), 3),
}


@pytest.mark.parametrize("name", sorted(VISION))
def test_vision_models_with_symbolic_image_sizes(name):
    factory, n_attention = VISION[name]
    torch.manual_seed(0)
    model = factory().eval()
    g = torch.Generator().manual_seed(0)
    compiled = moh_compile.compile(model, {"pixel_values": torch.randn(2, 3, 32, 32, generator=g)})
    ops = [n.target for n in compiled.graph_module.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.moh_compile.attention.default) == n_attention, compiled.report.skipped
    x = {"pixel_values": torch.randn(3, 3, 32, 32, generator=g)}
    with torch.no_grad():
        assert (compiled(**x).pooler_output - model(**x).pooler_output).abs().max().item() <= 1e-5


def test_unforeseen_matcher_failure_skips_the_block_with_a_reason(monkeypatch):
    """A matcher bug on an unusual graph costs that block (reason in the report), not the compile."""
    import moh_compile.match.attention as matcher

    def broken(*args):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(matcher, "_match_block", broken)
    model = CONFIGS["qwen2"]().eval()
    with pytest.raises(moh_compile.MohCompileError, match="matcher failed on this graph .ZeroDivisionError"):
        moh_compile.inspect(model, _inputs("qwen2", 2, 8))

"""Tiny models for structure tests: every architecture the matcher must handle, built from
configs (random weights) so tests are fast. The real pretrained model is used for fidelity."""
from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class SDPABlock(nn.Module):
    """Hand-written attention with F.scaled_dot_product_attention (causal flag) + SwiGLU FFN."""

    def __init__(self, d=64, h=4, causal=True):
        super().__init__()
        self.h, self.causal = h, causal
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.gate, self.up, self.down = nn.Linear(d, 96, bias=False), nn.Linear(d, 96, bias=False), nn.Linear(96, d)
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, x):
        b, s, d = x.shape
        y = self.n1(x)
        q, k, v = (p(y).view(b, s, self.h, d // self.h).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        x = x + self.o(a.transpose(1, 2).reshape(b, s, d))
        y = self.n2(x)
        return x + self.down(F.silu(self.gate(y)) * self.up(y))


class GQASDPABlock(nn.Module):
    """Hand-written GQA with rotate-half RoPE and SDPA(enable_gqa=True): K/V stay (B, Hkv, S, D),
    SDPA repeats them itself (the modern hand-written form; HF emits it when no mask is passed).
    seq_major: RoPE applied before the transpose to heads-major, on (B, S, H, D) with cos/sin
    (S, 1, D), as in several hand-written LLaMA ports."""

    seq_major = False

    def __init__(self, d=64, h=4, kv=2):
        super().__init__()
        self.h, self.kv, self.hd = h, kv, d // h
        self.q, self.o = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
        self.k, self.v = nn.Linear(d, kv * self.hd, bias=False), nn.Linear(d, kv * self.hd, bias=False)
        self.gate, self.up, self.down = (nn.Linear(d, 96, bias=False), nn.Linear(d, 96, bias=False),
                                         nn.Linear(96, d, bias=False))
        self.n1, self.n2 = nn.RMSNorm(d), nn.RMSNorm(d)

    def _rope(self, t):
        s = t.shape[1 if self.seq_major else 2]
        inv = 1.0 / (10000 ** (torch.arange(0, self.hd, 2, dtype=torch.float32) / self.hd))
        ang = torch.arange(s, dtype=torch.float32)[:, None] * inv[None]
        ang = torch.cat([ang, ang], -1)
        if self.seq_major:
            ang = ang[:, None, :]
        cos, sin = ang.cos(), ang.sin()
        half = self.hd // 2
        return t * cos + torch.cat([-t[..., half:], t[..., :half]], -1) * sin

    def _heads(self, t, n):
        """(B, S, n*D) -> RoPE'd (B, n, S, D), RoPE before or after the transpose."""
        t = t.view(*t.shape[:2], n, self.hd)
        return self._rope(t).transpose(1, 2) if self.seq_major else self._rope(t.transpose(1, 2))

    def forward(self, x):
        b, s, d = x.shape
        y = self.n1(x)
        q, k = self._heads(self.q(y), self.h), self._heads(self.k(y), self.kv)
        v = self.v(y).view(b, s, self.kv, self.hd).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, s, d))
        y = self.n2(x)
        return x + self.down(F.silu(self.gate(y)) * self.up(y))


class SeqMajorRopeBlock(GQASDPABlock):
    """GQASDPABlock with RoPE applied sequence-major, on (B, S, H, D)."""

    seq_major = True


class ManualBlock(nn.Module):
    """Hand-written softmax(QK^T / sqrt(d)) V with a fused qkv Linear (timm style) + GELU MLP."""

    def __init__(self, d=64, h=4):
        super().__init__()
        self.h = h
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, x):
        b, s, d = x.shape
        qkv = self.qkv(self.n1(x)).reshape(b, s, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.h)
        out = att.softmax(dim=-1) @ v
        x = x + self.proj(out.transpose(1, 2).reshape(b, s, d))
        return x + self.fc2(F.gelu(self.fc1(self.n2(x))))


class NanoGPTBlock(nn.Module):
    """nanoGPT's hand-written causal attention: fused c_attn split three ways, scores filled with
    -inf where a registered tril buffer is 0, then softmax @ v."""

    def __init__(self, d=64, h=4, block_size=64):
        super().__init__()
        self.h = h
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.h, c // self.h).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
        y = (F.softmax(att, dim=-1) @ v).transpose(1, 2).contiguous().view(b, t, c)
        x = x + self.c_proj(y)
        return x + self.mlp(self.ln2(x))


class EinsumBlock(nn.Module):
    """Attention and FFN written with torch.einsum, research-code style: (d, heads, head_dim)
    projection weights ('bsd,dhk->bshk'), 'bshk,bthk->bhst' scores with a causal fill,
    'bhst,bthk->bshk' context, 'bshk,hkd->bsd' output projection, an einsum FFN on weights in
    nn.Linear layout with a separate bias add."""

    def __init__(self, d=64, h=4):
        super().__init__()
        hd = d // h
        self.wq, self.wk, self.wv = (nn.Parameter(torch.randn(d, h, hd) * d ** -0.5) for _ in range(3))
        self.wo = nn.Parameter(torch.randn(h, hd, d) * d ** -0.5)
        self.w1, self.b1 = nn.Parameter(torch.randn(4 * d, d) * d ** -0.5), nn.Parameter(torch.randn(4 * d) * 0.1)
        self.w2 = nn.Parameter(torch.randn(d, 4 * d) * (4 * d) ** -0.5)
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, x):
        y = self.n1(x)
        q, k, v = (torch.einsum("bsd,dhk->bshk", y, w) for w in (self.wq, self.wk, self.wv))
        s = torch.einsum("bshk,bthk->bhst", q, k) * q.shape[-1] ** -0.5
        n = x.shape[1]
        s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool, device=x.device).tril(), float("-inf"))
        ctx = torch.einsum("bhst,bthk->bshk", s.softmax(-1), v)
        x = x + torch.einsum("bshk,hkd->bsd", ctx, self.wo)
        hidden = F.gelu(torch.einsum("bsd,fd->bsf", self.n2(x), self.w1) + self.b1)
        return x + torch.einsum("bsf,df->bsd", hidden, self.w2)


class MHAModel(nn.Module):
    """A custom model around nn.MultiheadAttention (need_weights default: the bmm path)."""

    def __init__(self, d=64, h=4):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, h, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 128), nn.GELU(), nn.Linear(128, d))

    def forward(self, x):
        return self.mlp(self.attn(x, x, x)[0] + x)


def hf(name):
    import transformers as T

    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    if name == "gpt2":
        m = T.GPT2Model(T.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=64,
                                     bos_token_id=0, eos_token_id=0))
        return m, {"input_ids": ids, "use_cache": False}
    if name == "llama":
        m = T.LlamaModel(T.LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=128, vocab_size=100))
        return m, {"input_ids": ids, "use_cache": False}
    if name == "llama_mqa":
        m = T.LlamaModel(T.LlamaConfig(num_hidden_layers=1, hidden_size=64, num_attention_heads=4,
                                       num_key_value_heads=1, intermediate_size=128, vocab_size=100))
        return m, {"input_ids": ids, "use_cache": False}
    if name == "bert":
        m = T.BertModel(T.BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                     intermediate_size=128, vocab_size=100))
        mask = torch.ones_like(ids)
        mask[1, -3:] = 0  # padding in the second sequence
        return m, {"input_ids": ids, "attention_mask": mask}
    if name == "gpt_neox":  # fused qkv laid out per head, partial rotate-half RoPE (Pythia)
        m = T.GPTNeoXModel(T.GPTNeoXConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                           intermediate_size=128, vocab_size=100, rotary_pct=0.25))
        return m, {"input_ids": ids, "use_cache": False}
    if name == "phi":  # partial rotate-half RoPE, separate projections, parallel attention and MLP
        m = T.PhiModel(T.PhiConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                   intermediate_size=128, vocab_size=100, partial_rotary_factor=0.5))
        return m, {"input_ids": ids, "use_cache": False}
    if name == "gptj":  # interleaved ("rotate every two") partial RoPE applied as (B, S, H, D)
        m = T.GPTJModel(T.GPTJConfig(n_layer=2, n_embd=64, n_head=4, vocab_size=100, rotary_dim=8, n_positions=64,
                                     bos_token_id=0, eos_token_id=0))
        return m, {"input_ids": ids, "use_cache": False}
    if name == "falcon":  # fused qkv grouped per KV head [q.., k, v] (GQA), x @ W.T projections
        m = T.FalconModel(T.FalconConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=8, num_kv_heads=2,
                                         new_decoder_architecture=True, vocab_size=100))
        return m, {"input_ids": ids, "use_cache": False}
    if name in ("bart", "t5"):  # encoder-decoder: self-attention both sides, decoder cross-attention
        if name == "bart":
            m = T.BartModel(T.BartConfig(encoder_layers=1, decoder_layers=1, d_model=64, encoder_attention_heads=4,
                                         decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                                         vocab_size=100, max_position_embeddings=64))
        else:  # T5: relative position bias as a per-head additive mask, no 1/sqrt(d) scaling
            m = T.T5Model(T.T5Config(num_layers=1, num_decoder_layers=1, d_model=64, d_kv=16, num_heads=4, d_ff=128,
                                     vocab_size=100))
        return m, {"input_ids": ids, "decoder_input_ids": ids[:, :5], "use_cache": False}
    if name == "qwen3":  # QK-norm: each query and key head RMS-normalised before RoPE; GQA
        m = T.Qwen3Model(T.Qwen3Config(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                       num_key_value_heads=2, head_dim=16, intermediate_size=128, vocab_size=100))
        with torch.no_grad():  # norm scales start at 1: make them matter, so a misplaced one shows
            for n, p in m.named_parameters():
                if n.endswith("norm.weight"):
                    p.copy_(torch.linspace(0.5, 1.5, p.numel())[torch.randperm(p.numel())])
        return m, {"input_ids": ids, "use_cache": False}
    if name == "vit":
        m = T.ViTModel(T.ViTConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                   intermediate_size=128, image_size=32, patch_size=8))
        return m, {"pixel_values": torch.randn(2, 3, 32, 32)}
    raise KeyError(name)


@functools.lru_cache(maxsize=None)
def captured(name):
    """One torch.export capture of `build(name)` per test process, for tests that compile a zoo model
    again (moh_compile.compile(..., captured=captured(name))): torch.export is most of a small
    model's compile time, and the suite compiles each zoo model a dozen times. build() is seeded,
    so the capture fits every model it builds (Captured.for_model checks names, shapes, dtypes).
    test_identity_rewrite and test_more_architectures still capture every model afresh."""
    import moh_compile

    model, inputs, _, _ = build(name)
    return moh_compile.capture(model, inputs)


def build(name):
    """(model in eval mode, example inputs, expected (attention, ffn) counts, expected facts)."""
    torch.manual_seed(0)
    x_bf = torch.randn(2, 8, 64)
    if name in ("gpt2", "llama", "llama_mqa", "bert", "vit", "gpt_neox", "phi", "gptj", "falcon", "bart", "t5",
                "qwen3"):
        m, inputs = hf(name)
        layers = {"llama_mqa": 1, "bart": 3, "t5": 3}.get(name, 2)
        ffns = {"llama_mqa": 1}.get(name, 2)
        facts = {"gpt2": dict(heads=4, kv=4, causal=True, rope=False, fused=True, act="gelu_tanh"),
                 "llama": dict(heads=4, kv=2, causal=True, rope=True, fused=False, act="silu", gated=True),
                 "llama_mqa": dict(heads=4, kv=1, causal=True, rope=True, fused=False, act="silu", gated=True),
                 "bert": dict(heads=4, kv=4, causal=False, rope=False, fused=False, act="gelu"),
                 "vit": dict(heads=4, kv=4, causal=False, rope=False, fused=False, act="gelu"),
                 "gpt_neox": dict(heads=4, kv=4, causal=True, rope=True, fused=True, act="gelu"),
                 "phi": dict(heads=4, kv=4, causal=True, rope=True, fused=False, act="gelu_tanh"),
                 "gptj": dict(heads=4, kv=4, causal=True, rope=True, fused=False, act="gelu_tanh"),
                 # Falcon repeats K/V to every query head before RoPE, so the op takes them repeated
                 "falcon": dict(heads=8, kv=8, causal=True, rope=True, fused=True, act="gelu", kv_repeated=True),
                 # causal None: encoder (two-sided), decoder (causal) and cross blocks in one model
                 "bart": dict(heads=4, kv=4, causal=None, rope=False, fused=False, act="gelu", cross=1),
                 "t5": dict(heads=4, kv=4, causal=None, rope=False, fused=False, act="relu", cross=1, scale=1.0,
                            per_head_mask=True),
                 "qwen3": dict(heads=4, kv=2, causal=True, rope=True, fused=False, act="silu", gated=True,
                               qk_norm=True)}[name]
        return m.eval(), inputs, (layers, ffns), facts
    if name.startswith("tel"):
        bf, nf = "bf" in name, "nf" in name
        layer = nn.TransformerEncoderLayer(64, 4, 128, batch_first=bf, norm_first=nf)
        m = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        x = x_bf if bf else x_bf.transpose(0, 1).contiguous()
        return m.eval(), (x,), (2, 2), dict(heads=4, kv=4, causal=False, rope=False, fused=True, act="relu")
    if name == "tel_layer":
        return (nn.TransformerEncoderLayer(64, 4, 128, batch_first=True).eval(), (x_bf,), (1, 1),
                dict(heads=4, kv=4, causal=False, rope=False, fused=True, act="relu"))
    if name == "mha":
        return MHAModel().eval(), (x_bf,), (1, 1), dict(heads=4, kv=4, causal=False, rope=False, fused=True,
                                                       act="gelu")
    if name == "sdpa_block":
        return SDPABlock().eval(), (x_bf,), (1, 1), dict(heads=4, kv=4, causal=True, rope=False, fused=False,
                                                         act="silu", gated=True)
    if name == "gqa_sdpa":
        return GQASDPABlock().eval(), (x_bf,), (1, 1), dict(heads=4, kv=2, causal=True, rope=True, fused=False,
                                                            act="silu", gated=True)
    if name == "rope_bshd":
        return SeqMajorRopeBlock().eval(), (x_bf,), (1, 1), dict(heads=4, kv=2, causal=True, rope=True, fused=False,
                                                                 act="silu", gated=True)
    if name == "nanogpt":
        return NanoGPTBlock().eval(), (x_bf,), (1, 1), dict(heads=4, kv=4, causal=True, rope=False, fused=True,
                                                            act="gelu")
    if name == "einsum_block":
        return EinsumBlock().eval(), (x_bf,), (1, 1), dict(heads=4, kv=4, causal=True, rope=False, fused=False,
                                                           act="gelu")
    if name == "manual_block":
        return ManualBlock().eval(), (x_bf,), (1, 1), dict(heads=4, kv=4, causal=False, rope=False, fused=True,
                                                           act="gelu")
    raise KeyError(name)


ALL = ["gpt2", "llama", "llama_mqa", "bert", "vit", "tel", "tel_bf", "tel_nf", "tel_bf_nf", "tel_layer", "mha",
       "sdpa_block", "gqa_sdpa", "rope_bshd", "manual_block", "einsum_block", "gpt_neox", "phi", "gptj", "falcon", "bart", "t5", "nanogpt",
       "qwen3"]


def reshape_inputs(inputs, batch, seq):
    """The same kind of inputs at another (batch, seq) shape."""
    gen = torch.Generator().manual_seed(batch * 100 + seq)
    if isinstance(inputs, dict):
        out = {}
        for k, v in inputs.items():
            if k == "pixel_values":
                out[k] = torch.randn(batch, *v.shape[1:], generator=gen)
            elif k == "input_ids":
                out[k] = torch.randint(0, 100, (batch, seq), generator=gen)
            elif k == "decoder_input_ids":  # a decoder length of its own
                out[k] = torch.randint(0, 100, (batch, max(1, seq - 3)), generator=gen)
            elif k == "attention_mask":
                mask = torch.ones(batch, seq, dtype=v.dtype)
                mask[-1, -2:] = 0
                out[k] = mask
            else:
                out[k] = v
        return out
    (x,) = inputs
    seq_first = x.shape[1] == 2 and x.shape[0] == 8
    shape = (seq, batch, x.shape[-1]) if seq_first else (batch, seq, x.shape[-1])
    return (torch.randn(*shape, generator=gen),)


def main_output(out):
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    if isinstance(out, dict):
        return out["last_hidden_state"]
    return out[0]

"""Matching finds every block, by structure, on every supported architecture, and describes it."""
import pytest
import torch

import moh_compile
from tests.models import ALL, build, captured


@pytest.mark.parametrize("name", ALL)
def test_blocks_found_and_described(name):
    model, inputs, (n_attn, n_ffn), facts = build(name)
    insp = moh_compile.inspect(model, inputs, captured(name))
    attn = [m.block for m in insp.matches.attention]
    ffn = [m.block for m in insp.matches.ffn]
    assert len(attn) == n_attn, [s.reason for s in insp.matches.skipped]
    assert len(ffn) == n_ffn
    for b in attn:
        assert b.num_heads == facts["heads"]
        assert b.num_kv_heads == facts["kv"]
        assert b.head_dim == 64 // facts["heads"]
        assert b.d_model == 64 and b.d_out == 64
        assert b.scale == pytest.approx(facts.get("scale", 1 / (64 // facts["heads"]) ** 0.5))
        if facts["causal"] is not None:
            assert b.causal is facts["causal"]
        assert b.rope is facts["rope"]
        assert b.qk_norm is facts.get("qk_norm", False)
        assert b.q.fused is facts["fused"]
        assert b.q.weight is not None and b.o.weight is not None
        assert b.params > 0
    assert sum(b.cross for b in attn) == facts.get("cross", 0)
    for b in ffn:
        assert b.activation == facts["act"]
        assert b.gated is facts.get("gated", False)
        assert b.d_model == 64


@pytest.mark.parametrize("name", ["bart", "t5"])
def test_encoder_decoder_blocks(name):
    """Encoder self-attention is two-sided, decoder self-attention causal, and cross-attention
    (decoder queries, encoder keys) is matched as such."""
    model, inputs, _, _ = build(name)
    attn = {m.block.name: m.block for m in moh_compile.inspect(model, inputs).matches.attention}
    kinds = sorted((b.cross, b.causal) for b in attn.values())
    assert kinds == [(False, False), (False, True), (True, False)], attn.keys()
    assert all(n.startswith("encoder.") == (not b.cross and not b.causal) for n, b in attn.items())


def test_attention_type_labels():
    _, _, _, _ = build("llama")
    model, inputs, _, _ = build("llama")
    types = {m.block.attention_type for m in moh_compile.inspect(model, inputs).matches.attention}
    assert types == {"GQA"}
    model, inputs, _, _ = build("llama_mqa")
    assert {m.block.attention_type for m in moh_compile.inspect(model, inputs).matches.attention} == {"MQA"}


def test_padding_mask_recorded_for_bert():
    model, inputs, _, _ = build("bert")
    blocks = [m.block for m in moh_compile.inspect(model, inputs).matches.attention]
    assert all(b.has_mask for b in blocks)


def test_block_names_come_from_module_paths():
    model, inputs, _, _ = build("bert")
    insp = moh_compile.inspect(model, inputs)
    names = [m.block.name for m in insp.matches.attention]
    assert names == ["encoder.layer.0.attention", "encoder.layer.1.attention"]
    assert [m.block.layer for m in insp.matches.attention] == [0, 1]


def test_attention_weights_returned_are_skipped_not_rewritten():
    class ReturnsWeights(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.MultiheadAttention(32, 4, batch_first=True)

        def forward(self, x):
            out, w = self.a(x, x, x)
            return out, w

    with pytest.raises(moh_compile.MohCompileError, match="no attention blocks"):
        moh_compile.inspect(ReturnsWeights().eval(), (torch.randn(2, 6, 32),))


class _FilledScores(torch.nn.Module):
    """Hand-written attention whose scores are masked with `value`, then scaled by `post`. form:
    "masked_fill" (nanoGPT), "where" (GPT-Neo: torch.where(keep, scores, a constant 0-d tensor)),
    "add" (an additive mask, value where masked; CodeGen scales after adding it)."""

    def __init__(self, value, post=1.0, form="masked_fill"):
        super().__init__()
        self.value, self.post, self.form = value, post, form
        self.qkv, self.o = torch.nn.Linear(64, 192), torch.nn.Linear(64, 64)
        self.register_buffer("fill", torch.tensor(value), persistent=False)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = (t.view(b, s, 4, 16).transpose(1, 2) for t in self.qkv(x).split(64, dim=-1))
        scores = (q @ k.transpose(-2, -1)) / 4.0
        keep = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
        if self.form == "where":
            scores = torch.where(keep, scores, self.fill)
        elif self.form == "add":
            scores = scores + torch.zeros(s, s, device=x.device).masked_fill(~keep, self.value)
        else:
            scores = scores.masked_fill(~keep, self.value)
        scores = scores * self.post
        return self.o((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, 64))


@pytest.mark.parametrize("value,form,reason", [(0.5, "masked_fill", "not a masking value"),
                                               (0.5, "where", "not a masking value")])
def test_masking_the_op_cannot_express_is_skipped_with_a_reason(value, form, reason):
    with pytest.raises(moh_compile.MohCompileError, match=reason):
        moh_compile.inspect(_FilledScores(value, form=form).eval(), (torch.randn(2, 8, 64),))


@pytest.mark.parametrize("value,post,form", [(float("-inf"), 2.0, "masked_fill"), (-1e9, 0.5, "masked_fill"),
                                             (torch.finfo(torch.float32).min, 1.0, "where"),
                                             (-1e9, 0.25, "where"), (-1e9, 0.5, "add")])
def test_masks_in_any_form_and_scales_after_them_are_exact(value, post, form):
    """torch.where fills (GPT-Neo) and a scaling after the mask (CodeGen: (QK^T + mask) / sqrt(d))
    fold into the op's mask and scale: (s + m) c = s c + m c."""
    model = _FilledScores(value, post, form).eval()
    (m,) = moh_compile.inspect(model, (torch.randn(2, 8, 64),)).matches.attention
    assert m.block.scale == pytest.approx(post / 4.0) and m.block.causal is True
    compiled = moh_compile.compile(model, (torch.randn(2, 8, 64),))
    x = torch.randn(3, 11, 64)
    with torch.no_grad():
        assert (compiled(x) - model(x)).abs().max().item() <= 1e-5


def test_masked_fill_attention_is_causal_and_exact():
    """A -inf fill becomes the op's bool mask; causality is read from the masked scores."""
    model = _FilledScores(float("-inf")).eval()
    (m,) = moh_compile.inspect(model, (torch.randn(2, 8, 64),)).matches.attention
    assert m.block.causal is True and m.block.has_mask and [s.kind for s in m.mask_steps] == ["fill"]
    compiled = moh_compile.compile(model, (torch.randn(2, 8, 64),))
    x = torch.randn(3, 11, 64)
    with torch.no_grad():
        assert (compiled(x) - model(x)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("spelling", [lambda t: torch.relu(t) ** 2, lambda t: torch.relu(t) * torch.relu(t),
                                      lambda t: torch.square(torch.nn.functional.relu(t))])
def test_squared_relu_is_named_in_any_spelling(spelling):
    """Persimmon's and Nemotron's FFN activation (relu(x)^2) is known by its values, not its ops."""
    from moh_compile.ops.activations import apply_activation, apply_activation_, identify_activation

    assert identify_activation(spelling) == "relu2"
    t = torch.linspace(-3, 3, 101)
    assert torch.equal(apply_activation_("relu2", t.clone()), apply_activation("relu2", t))


class _ScaledScores(torch.nn.Module):
    """softmax(Q K^T * t) V with t a one-element buffer (a constant) or parameter (learned)."""

    def __init__(self, learned: bool):
        super().__init__()
        self.q, self.k, self.v, self.o = (torch.nn.Linear(64, 64) for _ in range(4))
        t = torch.tensor(0.3)
        if learned:
            self.t = torch.nn.Parameter(t)
        else:
            self.register_buffer("t", t)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = (p(x).view(b, s, 4, 16).transpose(1, 2) for p in (self.q, self.k, self.v))
        att = ((q @ k.transpose(-2, -1)) * torch.sqrt(self.t * 3.0)).softmax(-1)
        return self.o((att @ v).transpose(1, 2).reshape(b, s, 64))


def test_scale_computed_from_a_constant_is_read_but_a_learned_one_is_not_frozen():
    """A scale computed from a buffer is folded into the op (exactly); a learned temperature would
    be frozen into a number, so that block is left alone, with a reason."""
    x = torch.randn(2, 8, 64)
    insp = moh_compile.inspect(_ScaledScores(learned=False).eval(), (x,))
    assert insp.matches.attention[0].block.scale == pytest.approx(0.9 ** 0.5)
    with pytest.raises(moh_compile.MohCompileError, match="not a Q K\\^T product"):
        moh_compile.inspect(_ScaledScores(learned=True).eval(), (x,))

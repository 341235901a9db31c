"""MoE++ op: identity with the dense FFN, routed outputs vs the dense reference, gradients,
export, and the one-line errors for invalid settings."""
from __future__ import annotations

import pytest
import torch

from moh_compile.kernels import moe_fine
from moh_compile.kernels.moe_dispatch import moepp_dispatch, stable_order
from moh_compile.ops.activations import ACTIVATIONS, apply_activation, apply_activation_
from moh_compile.ops.ffn import ffn_reference
from moh_compile.ops.moepp import moepp_ffn, moepp_ffn_reference, split_ffn_into_experts

ATOL = 1e-5


def dense_weights(d, hidden, gated, gen, d_out=None):
    d_out = d if d_out is None else d_out
    w = {
        "w_in": torch.randn(hidden, d, generator=gen) / d**0.5,
        "b_in": torch.randn(hidden, generator=gen) * 0.1,
        "w_out": torch.randn(d_out, hidden, generator=gen) / hidden**0.5,
        "b_out": torch.randn(d_out, generator=gen) * 0.1,
        "w_gate": None,
        "b_gate": None,
    }
    if gated:
        w["w_gate"] = torch.randn(hidden, d, generator=gen) / d**0.5
        w["b_gate"] = torch.randn(hidden, generator=gen) * 0.1
    return w


def experts_of(w, groups):
    return split_ffn_into_experts(w["w_in"], w["b_in"], w["w_out"], w["w_gate"], w["b_gate"], groups)


def op_args(x, ex, b_out, idx, wt, cv=None, cg=None, n_zero=0, n_copy=0, act="silu"):
    return (x, ex["w_in"], ex["b_in"], ex["w_gate"], ex["b_gate"], ex["w_out"], b_out, idx, wt, cv, cg,
            n_zero, n_copy, act)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("act", ["silu", "gelu", "relu"])
def test_identity_equals_dense_ffn(gated, act):
    gen = torch.Generator().manual_seed(1)
    d, hidden, n = 24, 96, 8
    w = dense_weights(d, hidden, gated, gen)
    groups = torch.randperm(hidden, generator=gen).view(n, -1)
    ex = experts_of(w, groups)
    x = torch.randn(3, 7, d, generator=gen)
    idx = torch.arange(n).expand(3, 7, n).contiguous()
    wt = torch.ones(3, 7, n)
    want = ffn_reference(x, w["w_in"], w["b_in"], w["w_out"], w["b_out"], w["w_gate"], w["b_gate"], act)
    args = op_args(x, ex, w["b_out"], idx, wt, act=act)
    got = moepp_ffn(*args)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    torch.testing.assert_close(moepp_ffn_reference(*args), want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_inplace_activations_equal_the_definitions(act):
    """The dispatch kernel applies activations in place on its scratch buffers; every known
    activation must give exactly what the definition gives, and the kernel the reference."""
    t = torch.linspace(-6, 6, 1001)
    assert torch.equal(apply_activation_(act, t.clone()), apply_activation(act, t))
    gen = torch.Generator().manual_seed(7)
    for gated in (False, True):
        w = dense_weights(12, 48, gated, gen)
        ex = experts_of(w, torch.arange(48).view(6, -1))
        x = torch.randn(17, 12, generator=gen)
        idx = torch.stack([torch.randperm(6, generator=gen)[:3] for _ in range(17)])
        args = op_args(x, ex, w["b_out"], idx, torch.rand(17, 3, generator=gen), act=act)
        for layout in ("sorted", "rows") if moe_fine.available() else ("sorted",):
            torch.testing.assert_close(moepp_dispatch(*args, layout=layout), moepp_ffn_reference(*args), atol=ATOL,
                                       rtol=0)


@pytest.mark.parametrize("gated", [False, True])
def test_identity_with_unequal_groups_padded(gated):
    gen = torch.Generator().manual_seed(2)
    d, hidden = 16, 37
    w = dense_weights(d, hidden, gated, gen)
    perm = torch.randperm(hidden, generator=gen).tolist()
    groups = [perm[:5], perm[5:17], perm[17:18], perm[18:]]  # sizes 5, 12, 1, 19
    ex = experts_of(w, groups)
    assert ex["w_in"].shape == (4, 19, d) and ex["w_out"].shape == (4, d, 19)
    # padding neurons are exactly zero everywhere
    assert ex["w_in"][2, 1:].abs().sum() == 0 and ex["b_in"][2, 1:].abs().sum() == 0
    assert ex["w_out"][2, :, 1:].abs().sum() == 0
    x = torch.randn(11, d, generator=gen)
    idx = torch.arange(4).expand(11, 4).contiguous()
    want = ffn_reference(x, w["w_in"], w["b_in"], w["w_out"], w["b_out"], w["w_gate"], w["b_gate"], "sigmoid")
    got = moepp_ffn(*op_args(x, ex, w["b_out"], idx, torch.ones(11, 4), act="sigmoid"))
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def routed_case(gen, gated=True, n=6, n_zero=2, n_copy=1, n_const=2, k=4, shape=(2, 9)):
    d, hidden = 20, 60
    w = dense_weights(d, hidden, gated, gen)
    ex = experts_of(w, torch.arange(hidden).view(n, -1))
    total = n + n_zero + n_copy + n_const
    x = torch.randn(*shape, d, generator=gen)
    idx = torch.randint(0, total, (*shape, k), generator=gen)
    wt = torch.randn(*shape, k, generator=gen)
    cv = torch.randn(n_const, d, generator=gen) if n_const else None
    cg = torch.randn(n_const, 2, d, generator=gen) if n_const else None
    return op_args(x, ex, w["b_out"], idx, wt, cv, cg, n_zero, n_copy, "gelu")


def manual_expert(args, e, xt):
    """Expert e on one token, written out from the paper's definitions."""
    x, w_in, b_in, w_gate, b_gate, w_out, b_out, idx, wt, cv, cg, n_zero, n_copy, act = args
    n = w_in.shape[0]
    if e < n:
        h = w_in[e] @ xt + b_in[e]
        g = w_gate[e] @ xt + b_gate[e]
        return w_out[e] @ (torch.nn.functional.gelu(g) * h)
    if e < n + n_zero:
        return torch.zeros_like(xt)
    if e < n + n_zero + n_copy:
        return xt
    c = e - n - n_zero - n_copy
    a = torch.softmax(cg[c] @ xt, dim=0)
    return a[0] * xt + a[1] * cv[c]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_routing_matches_reference_and_formula(seed):
    gen = torch.Generator().manual_seed(seed)
    args = routed_case(gen)
    idx = args[7].clone()
    idx[0, 0, 1] = idx[0, 0, 0]  # a duplicate index in one token's slots
    idx[1, 3] = torch.tensor([0, 0, 0, 0])
    args = args[:7] + (idx,) + args[8:]
    got = moepp_ffn(*args)
    ref = moepp_ffn_reference(*args)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    for layout in ("sorted", "capacity", "rows"):
        if layout != "rows" or moe_fine.available():
            torch.testing.assert_close(moepp_dispatch(*args, layout=layout), ref, atol=ATOL, rtol=0)
    # every token's k choices honored: token-by-token sum of the chosen experts
    x, b_out, wt = args[0], args[6], args[8]
    for b in range(x.shape[0]):
        for s in range(x.shape[1]):
            want = b_out + sum(wt[b, s, j] * manual_expert(args, int(idx[b, s, j]), x[b, s]) for j in range(idx.shape[-1]))
            torch.testing.assert_close(got[b, s], want, atol=ATOL, rtol=0)


def test_expert_chosen_by_every_token_and_a_lookalike_with_a_repeat():
    """In the sorted layout an expert every token chose runs on x as is (no gather, no scatter); one
    with as many pairs as tokens but a repeated token (and a token missing) must take the gathered path."""
    gen = torch.Generator().manual_seed(7)
    args = routed_case(gen)
    idx = args[7].clone()
    idx[idx == 0] = 1
    idx[..., 0] = 0                      # expert 0: every token, once
    whole = args[:7] + (idx,) + args[8:]
    torch.testing.assert_close(moepp_dispatch(*whole, layout="sorted"), moepp_ffn_reference(*whole), atol=ATOL,
                               rtol=0)
    lookalike = idx.clone()
    lookalike[0, 1, 0] = 1               # token 1 drops expert 0 ...
    lookalike[0, 0, 1] = 0               # ... token 0 takes it twice: still one pair per token
    assert int((lookalike == 0).sum()) == idx.shape[0] * idx.shape[1]
    other = args[:7] + (lookalike,) + args[8:]
    torch.testing.assert_close(moepp_dispatch(*other, layout="sorted"), moepp_ffn_reference(*other), atol=ATOL,
                               rtol=0)


def test_output_does_not_alias_the_shared_workspace():
    """The sorted and row kernels keep scratch in a reused per-thread buffer; a result must survive
    later calls of any kernel that takes the buffer (here the MoE++ op again, larger)."""
    for layout in ("sorted", "rows") if moe_fine.available() else ("sorted",):
        gen = torch.Generator().manual_seed(5)
        first = moepp_dispatch(*routed_case(gen), layout=layout)
        kept = first.clone()
        moepp_dispatch(*routed_case(gen, shape=(4, 33)), layout=layout)
        assert torch.equal(first, kept)


def test_zero_copy_const_experts_exact():
    gen = torch.Generator().manual_seed(3)
    args = list(routed_case(gen, n=6, n_zero=2, n_copy=1, n_const=2, k=1, shape=(5,)))
    x, b_out, cv, cg = args[0], args[6], args[9], args[10]
    wt = torch.tensor([[0.7], [1.3], [-0.4], [2.0], [0.5]])
    idx = torch.tensor([[6], [7], [8], [9], [10]])  # zero, zero, copy, const0, const1
    args[7], args[8] = idx, wt
    out = moepp_ffn(*args) - b_out
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.equal(out[1], torch.zeros_like(out[1]))
    torch.testing.assert_close(out[2], -0.4 * x[2], atol=ATOL, rtol=0)
    for row, c in ((3, 0), (4, 1)):
        a = torch.softmax(cg[c] @ x[row], dim=0)
        torch.testing.assert_close(out[row], wt[row, 0] * (a[0] * x[row] + a[1] * cv[c]), atol=ATOL, rtol=0)


def test_unchosen_expert_weights_do_not_matter():
    gen = torch.Generator().manual_seed(4)
    args = list(routed_case(gen, n_const=0, n_copy=0, k=2))
    args[7] = torch.randint(0, 3, args[7].shape, generator=gen)  # only experts 0..2 chosen
    base = moepp_ffn(*args)
    for pos in (1, 3, 5):  # w_in, w_gate, w_out
        poisoned = args[pos].clone()
        poisoned[3:] = float("nan")
        args2 = list(args)
        args2[pos] = poisoned
        assert torch.equal(moepp_ffn(*args2), base)


def test_gradients_match_reference_autograd():
    gen = torch.Generator().manual_seed(5)
    args = list(routed_case(gen, shape=(3, 4)))
    diff_pos = [0, 1, 2, 3, 4, 5, 6, 8, 9, 10]
    leaves_op = [args[p].clone().requires_grad_(True) for p in diff_pos]
    leaves_ref = [args[p].clone().requires_grad_(True) for p in diff_pos]

    def build(leaves):
        a = list(args)
        for p, leaf in zip(diff_pos, leaves):
            a[p] = leaf
        return a

    probe = torch.randn(3, 4, 20, generator=gen)
    (moepp_ffn(*build(leaves_op)) * probe).sum().backward()
    (moepp_ffn_reference(*build(leaves_ref)) * probe).sum().backward()
    for a, b in zip(leaves_op, leaves_ref):
        assert a.grad is not None
        torch.testing.assert_close(a.grad, b.grad, atol=ATOL, rtol=0)
    assert leaves_op[7].grad.abs().sum() > 0  # expert_weight gets a real gradient
    assert leaves_op[9].grad.abs().sum() > 0  # const gate weight too


def test_opcheck():
    gen = torch.Generator().manual_seed(6)
    args = routed_case(gen, shape=(2, 3))
    torch.library.opcheck(torch.ops.moh_compile.moepp_ffn.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_export_with_dynamic_batch_and_seq():
    gen = torch.Generator().manual_seed(7)
    args = routed_case(gen, shape=(2, 5))
    params = [a for a in args[1:7]] + [args[9], args[10]]

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for i, p in enumerate(params):
                self.register_buffer(f"p{i}", p)

        def forward(self, x, idx, wt):
            p = [getattr(self, f"p{i}") for i in range(len(params))]
            return torch.ops.moh_compile.moepp_ffn(x, *p[:6], idx, wt, p[6], p[7], args[11], args[12], args[13])

    auto = torch.export.Dim.AUTO
    dyn = {"x": {0: auto, 1: auto}, "idx": {0: auto, 1: auto}, "wt": {0: auto, 1: auto}}
    ep = torch.export.export(Block(), (args[0], args[7], args[8]), dynamic_shapes=dyn)
    assert any(n.target == torch.ops.moh_compile.moepp_ffn.default for n in ep.graph.nodes)
    x = torch.randn(3, 8, 20, generator=gen)
    idx = torch.randint(0, 11, (3, 8, 4), generator=gen)
    wt = torch.rand(3, 8, 4, generator=gen)
    got = ep.module()(x, idx, wt)
    want = moepp_ffn_reference(x, *args[1:7], idx, wt, *args[9:])
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_split_rejects_non_partitions():
    w = dense_weights(4, 8, False, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="partition"):
        split_ffn_into_experts(w["w_in"], w["b_in"], w["w_out"], groups=[[0, 1, 2], [3, 4, 5, 6, 0]])
    with pytest.raises(ValueError, match="partition"):
        split_ffn_into_experts(w["w_in"], w["b_in"], w["w_out"], groups=[[0, 1, 2], [3, 4, 5]])
    with pytest.raises(ValueError, match="lie in"):
        split_ffn_into_experts(w["w_in"], w["b_in"], w["w_out"], groups=[[0, 1, 2, 3], [4, 5, 6, 8]])


def test_invalid_settings_raise_one_line_value_errors():
    gen = torch.Generator().manual_seed(8)
    args = list(routed_case(gen, n=6, n_zero=2, n_copy=1, n_const=2, k=4))

    def raises(mutated, pattern):
        with pytest.raises(ValueError, match=pattern) as info:
            moepp_ffn(*mutated)
        assert "\n" not in str(info.value)

    a = list(args)
    a[7] = torch.zeros(2, 9, 12, dtype=torch.long)
    a[8] = torch.ones(2, 9, 12)
    raises(a, "k=12 exceeds")
    a = list(args)
    a[7] = a[7].clone()
    a[7][0, 0, 0] = 11
    raises(a, r"values must lie in \[0, 11\)")
    a[7][0, 0, 0] = -1
    raises(a, "values must lie in")
    # copy expert with d_out != d
    w = dense_weights(20, 60, False, gen, d_out=12)
    ex = experts_of(w, torch.arange(60).view(6, -1))
    x = torch.randn(4, 20, generator=gen)
    idx = torch.zeros(4, 2, dtype=torch.long)
    raises(op_args(x, ex, w["b_out"], idx, torch.ones(4, 2), n_copy=1), "d_out == d")
    raises(op_args(x, ex, w["b_out"], idx.int(), torch.ones(4, 2)), "int64")
    raises(op_args(x, ex, w["b_out"], idx, torch.ones(4, 2), act="swish2"), "unknown activation")
    raises(op_args(x, ex, w["b_out"], idx, torch.ones(4, 3)), "expert_weight shape")
    raises(op_args(x[:3], ex, w["b_out"], idx, torch.ones(4, 2)), "expert_idx must be")


@pytest.mark.parametrize("total", [5, 127, 300, 40000])
def test_stable_order_is_torch_stable_argsort(total):
    """The dispatch's radix sort (numpy, 8/16-bit keys) orders pairs exactly as torch's stable
    argsort, ties in their original order; ids too large for 16 bits fall back to torch."""
    from moh_compile.kernels.moe_dispatch import stable_order

    g = torch.Generator().manual_seed(total)
    for n in (10, 4096):
        flat = torch.randint(0, total, (n,), generator=g)
        got = stable_order(flat, total)
        assert got.dtype == torch.int64 and torch.equal(got, torch.argsort(flat, stable=True))

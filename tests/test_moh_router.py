"""HeadRouter, training-free fitting and distillation on tiny tensors (+ one slow real-MiniLM check)."""
import math

import pytest
import torch

from moh_compile.calibrate import moh_fit
from moh_compile.passes.moh_router import HeadRouter, find_routers

H, E = 6, 8


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: intra-op threads only add synchronisation cost (large on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_zero_router_all_active_is_identity():
    x = torch.randn(2, 5, E)
    for style in ("binary", "weighted"):
        r = HeadRouter(H, E, shared=[0, 3], k=H - 2, gate_style=style, comp_rank=2)
        gates, comp = r(x)
        assert torch.equal(gates, torch.ones(2, 5, H))
        assert torch.equal(comp, torch.zeros(2, 5, E))


@pytest.mark.parametrize("kind", ["learned", "query_norm", "random"])
def test_exact_active_count(kind):
    torch.manual_seed(0)
    r = HeadRouter(H, E, shared=[1], k=2, kind=kind, q_weight=torch.randn(H * 4, E), q_bias=torch.randn(H * 4))
    torch.nn.init.normal_(r.weight)
    gates, _ = r(torch.randn(3, 7, E))
    assert torch.equal(gates.sum(-1), torch.full((3, 7), 3.0))
    assert torch.equal(gates[..., 1], torch.ones(3, 7))


def test_query_norm_picks_largest_query_heads():
    qw = torch.zeros(H * 2, E)
    for h in range(H):
        qw[2 * h, h] = float(h + 1)          # ||q_h|| = (h+1)|x_h|
    r = HeadRouter(H, E, shared=[0], k=2, kind="query_norm", q_weight=qw)
    x = torch.ones(1, 1, E)
    assert r(x)[0].flatten().tolist() == [1, 0, 0, 0, 1, 1]


def test_binary_gates_and_ste_gradient():
    torch.manual_seed(0)
    r = HeadRouter(H, E, shared=[], k=3, comp_rank=1)
    torch.nn.init.normal_(r.weight)
    x = torch.randn(4, E)
    gates, comp = r(x)
    assert set(gates.unique().tolist()) <= {0.0, 1.0}
    (gates * torch.arange(H)).sum().backward()
    assert r.weight.grad is not None and r.weight.grad.abs().sum() > 0
    # STE: d gate_h / d score_h = sigmoid'(s_h - tau) > 0 for every routed head
    s = r.scores(x).detach()
    top = s.topk(4, dim=-1).values
    tau = 0.5 * (top[:, 2:3] + top[:, 3:4])
    sig = torch.sigmoid(s - tau)
    expected = (sig * (1 - sig) * torch.arange(H)).T @ x
    torch.testing.assert_close(r.weight.grad, expected, atol=1e-5, rtol=1e-5)


def test_weighted_gates_hand_case():
    r = HeadRouter(4, 2, shared=[0], k=2, gate_style="weighted")
    with torch.no_grad():
        r.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0], [2.0, 0.0]]))   # routed heads 1,2,3
        r.mix_weight.copy_(torch.tensor([[0.0, 1.0], [0.0, 0.0]]))
    x = torch.tensor([[math.log(3.0), math.log(3.0)]])
    g, _ = r(x)
    a = 2 * torch.softmax(torch.tensor([math.log(3.0), 0.0]), 0)             # [1.5, 0.5]
    s = torch.tensor([1.0, 0.0, 2.0]) * math.log(3.0)                       # scores: 3^1, 1, 3^2 after exp
    p_top = torch.tensor([3.0, 9.0]) / 12.0                                  # renormalised over heads 1, 3
    expected = torch.tensor([a[0] * 1.0, a[1] * 2 * p_top[0], 0.0, a[1] * 2 * p_top[1]])
    torch.testing.assert_close(g[0], expected, atol=1e-6, rtol=1e-6)
    assert s.argmin() == 1


def test_load_balance_hand_case():
    r = HeadRouter(3, 2, shared=[], k=1)
    with torch.no_grad():
        r.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    r.track_load_balance = True
    x = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    r(x)
    e2 = math.exp(2.0)
    p = torch.tensor([[e2, 1, 1], [1, e2, 1]]) / (e2 + 2)
    expected = (p.mean(0) * torch.tensor([0.5, 0.5, 0.0])).sum()
    torch.testing.assert_close(r.last_load_balance_loss, expected)
    assert find_routers(torch.nn.Sequential(torch.nn.Linear(2, 2), r)) == [r]


def test_mean_compensation_values():
    r = HeadRouter(3, 2, shared=[0], k=1)
    with torch.no_grad():
        r.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        r.comp_mean.copy_(torch.tensor([[9.0, 9.0], [1.0, 2.0], [10.0, 20.0]]))
    g, c = r(torch.tensor([[3.0, 0.0], [0.0, 3.0]]))
    assert g.tolist() == [[1, 1, 0], [1, 0, 1]]
    assert c.tolist() == [[10.0, 20.0], [1.0, 2.0]]


def test_invalid_settings():
    with pytest.raises(ValueError, match="gate_style"):
        HeadRouter(H, E, gate_style="soft")
    with pytest.raises(ValueError, match="k must be"):
        HeadRouter(H, E, shared=[0, 1], k=5)
    with pytest.raises(ValueError, match="query_norm needs|needs q_weight"):
        HeadRouter(H, E, kind="query_norm")


def _planted(t=2000, h=6, e=10, e_out=7, seed=0):
    """Head h's drop cost (contribution norm) is a positive linear function of x plus noise;
    contributions point in random directions. The router to recover is that linear map."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, e, generator=g)
    w = torch.randn(h, e, generator=g)
    scale = x @ w.T + 10.0 + 0.3 * torch.randn(t, h, generator=g)
    direc = torch.nn.functional.normalize(torch.randn(t, h, e_out, generator=g), dim=-1)
    return x, scale.unsqueeze(-1) * direc, w


def test_fit_recovers_planted_router():
    x, contrib, w = _planted()
    fit = moh_fit.fit_block(x, contrib, num_active=3, num_shared=0, compensate=False)
    assert torch.nn.functional.cosine_similarity(fit.weight.flatten(), w.flatten(), dim=0) > 0.99
    chosen = fit.router()(x)[0].bool()
    agree = (chosen == moh_fit.oracle_active(contrib, 3)).float().mean().item()
    assert agree > 0.95          # random choice agrees on 0.5 of pairs
    assert moh_fit.block_error(x, contrib, fit.router()) < moh_fit.block_error(x, contrib, _random_router(6, 10, 3))


def test_fit_recovers_exact_linear_scores():
    # when the drop cost itself is linear in x and positive, the ridge router reproduces the oracle
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2000, 5, generator=g)
    w = torch.randn(4, 5, generator=g)
    cost = x @ w.T + 20.0
    contrib = cost.unsqueeze(-1) * torch.tensor([1.0, 0.0, 0.0])
    fit = moh_fit.fit_block(x, contrib, num_active=2, num_shared=0, compensate=False, lam=1e-8)
    torch.testing.assert_close(fit.weight, w, atol=1e-3, rtol=1e-3)
    assert torch.equal(fit.router()(x)[0].bool(), moh_fit.oracle_active(contrib, 2))


def test_weighted_gate_scale_keeps_the_heads_and_matches_binary_or_better():
    """fit_gate_scale only sets the softmax temperature: the chosen heads stay, and the block error
    ends at or below the binary gates' (a near-zero temperature reproduces them) and below a
    badly scaled start's."""
    x, contrib, _ = _planted()
    fit = moh_fit.fit_block(x, contrib, num_active=3, num_shared=0)
    binary, weighted = fit.router("binary").eval(), fit.router("weighted").eval()
    with torch.no_grad():  # a temperature far from any useful one: very uneven gates
        weighted.gate_temperature.fill_(50.0)
    chosen = binary(x)[0] != 0
    err_raw = moh_fit.block_error(x, contrib, weighted)
    info = moh_fit.fit_gate_scale(weighted, x, contrib)
    assert info["scale"] in moh_fit.GATE_SCALES
    assert torch.equal(weighted(x)[0] != 0, chosen)
    err_fit, err_binary = moh_fit.block_error(x, contrib, weighted), moh_fit.block_error(x, contrib, binary)
    assert err_fit <= err_binary * 1.001
    assert err_fit < 0.5 * err_raw
    # the reported errors are the grid's, and the kept scale is their argmin
    assert min(info["rel_errors"], key=info["rel_errors"].get) == str(info["scale"])
    assert moh_fit.fit_gate_scale(binary, x, contrib) == {}


def test_compensation_fit_removes_constant_heads():
    # heads 0, 1 add a constant vector: mean compensation makes dropping them free
    t = 500
    x = torch.randn(t, 4)
    contrib = torch.randn(t, 4, 3) * 0.01
    contrib[:, 0] += torch.tensor([5.0, 0.0, 0.0])
    contrib[:, 1] += torch.tensor([0.0, -3.0, 1.0])
    contrib[:, 2:] += torch.randn(t, 2, 3)
    fit = moh_fit.fit_block(x, contrib, num_active=2, num_shared=2)
    assert fit.shared == [2, 3]
    assert moh_fit.block_error(x, contrib, fit.router()) < 0.01
    no_comp = moh_fit.fit_block(x, contrib, num_active=2, num_shared=0, compensate=False)
    assert moh_fit.block_error(x, contrib, no_comp.router()) > 0.3


def test_rank_compensation_recovers_linear_head():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(800, 6, generator=g)
    a, u = torch.randn(6, 1, generator=g), torch.randn(1, 5, generator=g)
    contrib = torch.zeros(800, 2, 5)
    contrib[:, 0] = x @ a @ u + 1.0
    contrib[:, 1] = 0.1 * torch.randn(800, 5, generator=g)
    fit = moh_fit.fit_block(x, contrib, num_active=1, num_shared=1, shared=[1], comp_rank=1, lam=1e-8)
    assert moh_fit.block_error(x, contrib, fit.router()) < 1e-3


def _random_router(h, e, k, e_out=7):
    r = HeadRouter(h, e, k=k, out_dim=e_out)
    torch.nn.init.normal_(r.weight, generator=torch.Generator().manual_seed(5))
    return r


def test_distill_trains_router_toward_teacher():
    from moh_compile.calibrate.distill import distill

    torch.manual_seed(0)

    class Block(torch.nn.Module):
        def __init__(self, router=None):
            super().__init__()
            self.router = router
            self.heads = torch.nn.Parameter(torch.randn(4, 3))

        def forward(self, x):
            contrib = torch.einsum("te,he->th", x, self.heads)               # per-head scalar outputs
            if self.router is None:
                return contrib.sum(-1, keepdim=True)
            g, c = self.router(x)
            return (g * contrib).sum(-1, keepdim=True) + c

    teacher = Block()
    student = Block(HeadRouter(4, 3, k=2, out_dim=1))
    student.heads = teacher.heads
    batches = [torch.randn(64, 3) for _ in range(8)]
    before = sum(torch.nn.functional.mse_loss(student(b), teacher(b)).item() for b in batches)
    hist = distill(student, teacher, batches, steps=150, lr=0.05, progress=False,
                   loss_fn=lambda s, t, b: torch.nn.functional.mse_loss(s, t))
    after = sum(torch.nn.functional.mse_loss(student(b), teacher(b)).item() for b in batches)
    assert hist["steps"] == 150
    assert after < 0.7 * before
    assert not student.heads.requires_grad or teacher.heads.requires_grad   # flags restored


class _ScaledTeacherTask(torch.nn.Module):
    """A linear student learning a fixed linear teacher: a task where every step's loss is known."""

    def __init__(self, weight):
        super().__init__()
        self.lin = torch.nn.Linear(3, 2, bias=False)
        self.lin.weight.data.copy_(weight)

    def forward(self, x):
        return self.lin(x)


def _val_loss(student, teacher, batches):
    with torch.no_grad():
        return sum(torch.nn.functional.mse_loss(student(b), teacher(b)).item() for b in batches) / len(batches)


@pytest.mark.parametrize("lr", [0.02, 3.0])
def test_distill_keeps_the_best_validated_weights(lr):
    """With validation batches the student ends at the weights of the best-measured step: at a
    sane lr that is a trained one, and at a diverging lr it is the start (training undone)."""
    from moh_compile.calibrate.distill import distill

    g = torch.Generator().manual_seed(0)
    w = torch.randn(2, 3, generator=g)
    teacher = _ScaledTeacherTask(w)
    student = _ScaledTeacherTask(w + 0.3 * torch.randn(2, 3, generator=g))  # close: Adam at lr 3 overshoots
    student.lin.weight.requires_grad_(True)
    batches = [torch.randn(32, 3, generator=g) for _ in range(6)]
    val = [torch.randn(32, 3, generator=g) for _ in range(2)]
    start = _val_loss(student, teacher, val)
    hist = distill(student, teacher, batches, steps=40, lr=lr, train="all", progress=False, val_batches=val,
                   val_every=10, loss_fn=lambda s, t, b: torch.nn.functional.mse_loss(s, t))
    steps_checked = [s for s, _ in hist["val_losses"]]
    assert steps_checked == [0, 10, 20, 30, 40] and hist["steps"] == 40
    final = _val_loss(student, teacher, val)
    assert final == pytest.approx(hist["best_val_loss"], rel=1e-5)
    assert hist["best_val_loss"] == pytest.approx(min(v for _, v in hist["val_losses"]), rel=1e-12)
    if lr < 1:
        assert hist["best_step"] == 40 and final < 0.1 * start
    else:
        assert max(v for _, v in hist["val_losses"]) > 10 * start  # it diverged ...
        assert hist["best_step"] == 0 and final == pytest.approx(start, rel=1e-6)  # ... and was undone


def test_split_validation_holds_out_the_last_batches():
    from moh_compile.finetune import MIN_BATCHES_FOR_VALIDATION, split_validation

    batches = list(range(32))
    assert split_validation(batches, 0.1) == (batches[:28], batches[28:])
    assert split_validation(batches, 0.0) == (batches, [])
    few = list(range(MIN_BATCHES_FOR_VALIDATION - 1))
    assert split_validation(few, 0.5) == (few, [])


def test_default_loss_token_and_pooled_terms():
    """The distillation loss: per-token (1 - cos) + relative MSE over real tokens, plus the weighted
    (1 - cos) of the mean-pooled outputs; padding never counts. Checked against explicit loops."""
    from moh_compile.calibrate.distill import DEFAULT_POOLED_WEIGHT, default_loss

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 4, generator=g), torch.randn(2, 5, 4, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    batch = {"attention_mask": mask}
    energy = t.pow(2).mean()
    tok, n, pooled = 0.0, 0, 0.0
    for b in range(2):
        real = [i for i in range(5) if mask[b, i]]
        for i in real:
            tok += 1 - torch.nn.functional.cosine_similarity(s[b, i], t[b, i], dim=0) + (s[b, i] - t[b, i]).pow(2).mean() / energy
            n += 1
        pooled += 1 - torch.nn.functional.cosine_similarity(s[b, real].mean(0), t[b, real].mean(0), dim=0)
    assert default_loss(s, t, batch, pooled_weight=0) == pytest.approx(float(tok / n), rel=1e-5)
    assert default_loss(s, t, batch, pooled_weight=3.0) == pytest.approx(float(tok / n + 3.0 * pooled / 2), rel=1e-5)
    assert default_loss(s, t, batch) == pytest.approx(float(tok / n + DEFAULT_POOLED_WEIGHT * pooled / 2), rel=1e-5)
    s2 = s.clone()
    s2[0, 3:] = 1e3  # padding positions: no effect
    assert default_loss(s2, t, batch) == pytest.approx(default_loss(s, t, batch).item(), rel=1e-6)
    assert default_loss(t, t, batch).item() == pytest.approx(0.0, abs=1e-6)

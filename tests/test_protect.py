"""The protected solve on tiny random models and synthetic matrices: the prior meets its steer rows, leaves a
protected set alone, only the chosen columns move, backtracking never accepts a worse loss, the corpus
statistic is cached and never trusted when broken."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from star_engine.case import RepairCase
from star_engine.corpus import CorpusSpec, corpus_files
from star_engine.locate import contrast_neurons, fisher_neurons, greedy_neurons
from star_engine.methods.star.solver import (Metric, least_change_patch, natural_direction, protected_metric, protected_prior,
                                             realise, seme_direction)
from star_engine.protect import STAT_CORPUS, corpus_statistic, statistic_path
from star_engine.repair import repair, undo
from star_engine.patch import WeightSnapshot

SMALL_STAT = CorpusSpec(split="stat", n_tokens=2048, window=64)


def _spd(k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4 * k, k, generator=g)
    return X.T @ X / (4 * k)


@pytest.mark.parametrize("kind", ["none", "covariance", "nullspace"])
def test_the_prior_meets_every_steer_row_exactly(kind):
    g = torch.Generator().manual_seed(1)
    k, d, n = 48, 16, 5
    Z, S = torch.randn(n, k, generator=g), torch.randn(n, d, generator=g)
    C = _spd(k, 2)
    C[:, :8] *= 1e-4     # a few directions the corpus hardly uses, so the null space is not empty
    C[:8, :] *= 1e-4
    metric = protected_metric(C, kind, ridge=1e-2, threshold=2e-2)
    P = protected_prior(Z, S, metric)
    assert P.shape == (d, k)
    torch.testing.assert_close(Z @ P.T, S, atol=1e-4, rtol=1e-4)


def test_the_covariance_prior_moves_the_corpus_less_than_the_plain_one():
    g = torch.Generator().manual_seed(3)
    k, d = 64, 8
    corpus = torch.randn(2000, k, generator=g) * torch.linspace(0.05, 3.0, k)   # uneven neuron activity
    C = corpus.T @ corpus / len(corpus)
    Z, S = torch.randn(3, k, generator=g), torch.randn(3, d, generator=g)
    plain = protected_prior(Z, S, Metric(None))
    weighted = protected_prior(Z, S, protected_metric(C, "covariance", ridge=1e-3, threshold=0.0))
    change = lambda P: float((corpus @ P.T).pow(2).mean())
    assert change(weighted) < 0.5 * change(plain)


def test_keep_rows_are_left_exactly_where_they_were():
    """A protected set K (zero-steer rows) gets no change at all, whatever the metric."""
    g = torch.Generator().manual_seed(4)
    k, d = 40, 12
    steer_rows, keep_rows = torch.randn(3, k, generator=g), torch.randn(6, k, generator=g)
    Z = torch.cat([steer_rows, keep_rows])
    S = torch.cat([torch.randn(3, d, generator=g), torch.zeros(6, d)])
    metric = protected_metric(_spd(k, 5), "covariance", ridge=1e-2, threshold=0.0)
    P = protected_prior(Z, S, metric)
    torch.testing.assert_close(keep_rows @ P.T, torch.zeros(6, d), atol=1e-5, rtol=0)
    # The sign step scrambles that; realising it again restores it, with the same effect on the steer rows.
    D = seme_direction(P, torch.randn(d, k, generator=g))
    steered = torch.tensor([True] * 3 + [False] * 6)
    R = realise(D, Z, steered, metric)
    torch.testing.assert_close(keep_rows @ R.T, torch.zeros(6, d), atol=1e-5, rtol=0)
    torch.testing.assert_close(steer_rows @ R.T, steer_rows @ D.T, atol=1e-4, rtol=1e-4)


def test_the_natural_direction_drops_the_loss_most_per_unit_of_corpus_change():
    g = torch.Generator().manual_seed(8)
    k, d, loss = 24, 6, 2.5
    G = {l: torch.randn(d, k, generator=g) for l in range(2)}
    corpus = torch.randn(1000, k, generator=g) * torch.linspace(0.05, 3.0, k)   # uneven neuron activity
    C = corpus.T @ corpus / len(corpus)
    metrics = {l: protected_metric(C, "covariance", ridge=1e-2, threshold=0.0) for l in G}
    D = natural_direction(G, metrics, loss)
    drop = lambda X: -sum(float((G[l] * X[l]).sum()) for l in G)
    assert drop(D) == pytest.approx(loss, rel=1e-4)
    cost = lambda X: sum(float((X[l] @ torch.linalg.inv(metrics[l].inverse.double()).float() * X[l]).sum()) for l in G)
    plain = {l: -G[l] for l in G}
    plain = {l: x * (cost(D) / cost(plain)) ** 0.5 for l, x in plain.items()}   # the same change on the corpus
    assert drop(D) > 1.5 * drop(plain)


@pytest.mark.parametrize("output", ["identity", "fisher"])
def test_the_least_change_patch_meets_the_linearised_margins_with_the_least_corpus_change(output):
    """tr(R ΔW Q ΔWᵀ) is least among the patches with the same first-order margins (R = I, or an output metric)."""
    g = torch.Generator().manual_seed(9)
    n, d, k = 4, 6, 20
    J = {l: torch.randn(n, d, k, generator=g) for l in range(2)}
    metrics = {l: protected_metric(_spd(k, 10 + l), "covariance", ridge=1e-2, threshold=0.0) for l in J}
    R = {l: _spd(d, 20 + l) + 1e-2 * torch.eye(d) if output == "fisher" else torch.eye(d) for l in J}
    if output == "fisher":
        metrics = {l: replace(m, output_inverse=torch.linalg.inv(R[l])) for l, m in metrics.items()}
    current = {l: torch.randn(d, k, generator=g) for l in J}
    shortfall = torch.randn(n, generator=g)
    W = least_change_patch(J, metrics, shortfall, current, damping=0.0)
    effect = lambda X: sum(torch.einsum("ndk,dk->n", J[l], X[l]) for l in J)
    delta = {l: W[l] - current[l] for l in J}
    torch.testing.assert_close(effect(delta), shortfall, atol=1e-3, rtol=1e-3)
    Q = {l: torch.linalg.inv(metrics[l].inverse.double()).float() for l in J}
    cost = lambda X: sum(float((R[l] @ X[l] @ Q[l] * X[l]).sum()) for l in J)
    # Any other patch with the same first-order margins (W plus a change J cannot see) costs more.
    flat = torch.cat([J[l].flatten(1) for l in J], 1)
    free = torch.randn(flat.shape[1], generator=g)
    free -= flat.T @ torch.linalg.lstsq(flat.T, free).solution
    split = free.split([d * k] * len(J))
    other = {l: W[l] + 0.1 * split[l].reshape(d, k) for l in J}
    torch.testing.assert_close(effect(other), effect(W), atol=1e-3, rtol=1e-3)
    assert cost(other) > cost(W)
    # The optimality condition itself: R W Q is a combination of the margin gradients.
    grad = torch.cat([(R[l] @ W[l] @ Q[l]).flatten() for l in J])
    lam = torch.linalg.lstsq(flat.T, grad).solution
    torch.testing.assert_close(flat.T @ lam, grad, atol=1e-3, rtol=1e-3)


def test_least_change_keeps_only_steps_that_shrink_the_shortfall_or_keep_the_fix(tiny_llama, small_stat, monkeypatch):
    from star_engine.methods.star import method as star_method

    trials, original = [], star_method.StarMethod._try_towards

    def recording(self, session, problem, layers, neurons, saved, patch, wanted, accept):
        with torch.no_grad():
            before = self._logits(session, problem)
        kept = original(self, session, problem, layers, neurons, saved, patch, wanted, accept)
        with torch.no_grad():
            after = self._logits(session, problem)
        trials.append((before, after, kept is None, problem.target))
        return kept

    monkeypatch.setattr(star_method.StarMethod, "_try_towards", recording)
    result = repair(tiny_llama, [PLANTED], "star", TINY_LEAST, guard=None)
    assert result.fixed, result.reason
    assert trials
    margin = float(TINY_LEAST.get("margin", 0.5))
    shortfall = lambda logits, target: star_method._shortfall(star_method._soft_margins(logits, target), margin)
    for before, after, refused, target in trials:
        if refused:
            torch.testing.assert_close(after, before)     # the columns back where they were
        elif float(star_method.target_leads(before, target).min()) >= margin:
            assert float(star_method.target_leads(after, target).min()) >= margin
        else:
            assert shortfall(after, target) < shortfall(before, target)
    undo(tiny_llama, result)


def test_an_earlier_fix_the_first_solve_moves_joins_as_keep_rows_and_is_kept(tiny_llama, small_stat, monkeypatch):
    from star_engine.capture import encode_case
    from star_engine.generate import writes_fix
    from star_engine.methods.star import method as star_method

    seen, original = [], star_method.StarMethod._margin_targets

    def recording(self, problem, start):
        wanted, floor = original(self, problem, start)
        seen.append((problem.kept.clone(), floor.clone()))
        return wanted, floor

    first = repair(tiny_llama, [PLANTED], "star", TINY_LEAST, guard=None)
    assert first.fixed, first.reason
    monkeypatch.setattr(star_method.StarMethod, "_margin_targets", recording)
    later = RepairCase("import os\nprint(", "os.getcwd())")
    second = repair(tiny_llama, [later], "star", TINY_LEAST | {"keep_rows": "64"}, protect=[PLANTED], guard=None)
    assert second.fixed, second.reason
    assert not bool(seen[0][0].any())          # the first solve sees the new targets only
    kept, floor = seen[-1]                     # this case's first solve moves the earlier fix: it joined
    assert int(kept.sum()) == len(encode_case(tiny_llama, PLANTED).target_ids)
    assert bool((floor[kept] == star_method._LEAST_LEAD).all())   # an earlier fix must only stay the argmax
    assert writes_fix(tiny_llama, encode_case(tiny_llama, PLANTED))[0]
    undo(tiny_llama, second)
    undo(tiny_llama, first)


def test_an_earlier_fix_joins_only_when_moved_past_its_allowance():
    from star_engine.methods.star import method as star_method

    target = torch.tensor([0, 0])
    before = torch.tensor([[3.0, 1.0, 0.0], [2.0, 1.0, 0.0]])
    earlier = star_method._Earlier(star_method._Problem([], [], target), star_method._Start.of(before, target))
    moved = lambda after: earlier.moved(after, margin=0.5)
    assert not moved(before)
    assert not moved(before - torch.tensor([[0.1, 0.0, 0.0], [0.0, 0.0, 0.0]]))   # within its allowance
    assert moved(before - torch.tensor([[0.0, 0.0, 0.0], [0.9, 0.0, 0.0]]))        # the soft margin fell too far
    assert moved(torch.tensor([[1.0, 1.0, 0.0], [2.0, 1.0, 0.0]]))                 # a tie is lost


def test_earlier_fixes_in_the_statistic_are_moved_less():
    g = torch.Generator().manual_seed(6)
    k, d = 32, 8
    C = _spd(k, 7)
    earlier = torch.randn(10, k, generator=g)
    Z, S = torch.randn(2, k, generator=g), torch.randn(2, d, generator=g)
    without = protected_prior(Z, S, protected_metric(C, "covariance", ridge=1e-2, threshold=0.0))
    with_keep = protected_prior(Z, S, protected_metric(C, "covariance", ridge=1e-2, threshold=0.0,
                                                        keep=earlier, keep_weight=10.0))
    moved = lambda P: float((earlier @ P.T).norm())
    assert moved(with_keep) < 0.5 * moved(without)


def test_contrast_neurons_prefer_active_and_corpus_quiet_ones():
    active = {0: torch.tensor([[5.0, 5.0, 0.1, 1.0]]), 1: torch.tensor([[1.0, 0.0, 0.0, 3.0]])}
    power = {0: torch.tensor([100.0, 1.0, 1.0, 1.0]), 1: torch.tensor([1.0, 1.0, 1.0, 0.01])}
    chosen = contrast_neurons(active, power, 2)
    assert {l: v.tolist() for l, v in chosen.items()} == {0: [1], 1: [3]}


def test_fisher_neurons_prefer_loss_gradient_per_unit_of_corpus_change():
    grads = {0: torch.tensor([[3.0, 1.0, 0.0], [0.0, 1.0, 0.1]]), 1: torch.tensor([[0.5, 2.0, 0.0], [0.5, 0.0, 0.0]])}
    power = {0: torch.tensor([100.0, 1.0, 1.0]), 1: torch.tensor([0.01, 1.0, 1.0])}
    chosen = fisher_neurons(grads, power, 2)   # scores: 0.09, 2, 0.01 | 50, 4, 0
    assert {l: v.tolist() for l, v in chosen.items()} == {1: [0, 1]}


def _natural_drop(G, Q, idx):
    """tr(G_S Q_SS⁻¹ G_Sᵀ): the first-order loss drop of the natural step on the columns idx."""
    Gs, Qs = G[:, idx].double(), Q[idx][:, idx].double()
    return float((Gs @ torch.linalg.solve(Qs, Gs.T)).trace())


def test_greedy_neurons_pick_a_pair_that_cancels_on_the_corpus():
    # Neurons 0 and 1 fire together on the corpus (nearly the same activation) but only neuron 0 carries
    # the gradient; 2 is independent and a little worse than 0 alone. Diagonal scores pick 0 and 2; the pair
    # (0, 1) moves the failure while cancelling on normal code, a far larger drop per unit of change.
    Q = {0: torch.tensor([[1.0, 0.99, 0.0], [0.99, 1.0, 0.0], [0.0, 0.0, 1.0]])}
    G = {0: torch.tensor([[1.0, 0.0, 0.9]])}
    diagonal = fisher_neurons(G, {0: Q[0].diagonal()}, 2)
    joint = greedy_neurons(G, lambda l, j: Q[l][:, j], {0: Q[0].diagonal()}, 2)
    assert diagonal[0].tolist() == [0, 2] and joint[0].tolist() == [0, 1]
    assert _natural_drop(G[0], Q[0], [0, 1]) > 10 * _natural_drop(G[0], Q[0], [0, 2])


def test_greedy_gains_add_up_to_the_natural_drop_of_the_chosen_columns():
    torch.manual_seed(0)
    X = torch.randn(3, 50, 12)
    Q = {l: X[l].T @ X[l] / 50 + 0.1 * torch.eye(12) for l in range(3)}
    G = {l: torch.randn(4, 12) for l in range(3)}
    chosen = greedy_neurons(G, lambda l, j: Q[l][:, j], {l: Q[l].diagonal() for l in Q}, 7)
    assert sum(len(v) for v in chosen.values()) == 7
    picked = sum(_natural_drop(G[l], Q[l], idx) for l, idx in chosen.items())
    for swap in range(20):   # no random 7-subset with the same per-layer counts beats the greedy pick much
        other = {l: torch.randperm(12)[: len(idx)] for l, idx in chosen.items()}
        assert sum(_natural_drop(G[l], Q[l], idx) for l, idx in other.items()) <= picked + 1e-9


# -- on tiny random models ---------------------------------------------------------------------------------

PLANTED = RepairCase("def add(a, b):\n    return", " a + b")
TINY = {"sparsity": "contrast", "neurons": "24", "steps": "40", "lr": "0.05", "step_rule": "minimal",
        "direction": "gradient"}
TINY_FISHER = {**TINY, "sparsity": "fisher", "direction": "natural", "lr": "1.0"}
TINY_GREEDY = {**TINY_FISHER, "sparsity": "greedy"}
TINY_LEAST = {**TINY_FISHER, "step_rule": "least_change", "steps": "10"}


@pytest.fixture
def small_stat(monkeypatch, tmp_path):
    """A small corpus statistic (fast on tiny models), cached under a temporary star cache."""
    monkeypatch.setenv("STAR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr("star_engine.protect._default_spec", lambda lm: SMALL_STAT)
    return tmp_path


def test_the_corpus_halves_are_disjoint_and_deterministic():
    stat, held = set(corpus_files("stat")), set(corpus_files("held"))
    assert stat and held and not stat & held
    assert any(p.suffix == ".h" for p in stat) and any(p.suffix == ".py" for p in stat)
    assert STAT_CORPUS.n_tokens >= 100_000


@pytest.mark.parametrize("settings", [TINY, TINY_FISHER, TINY_GREEDY, TINY_LEAST],
                         ids=["contrast-gradient", "fisher-natural", "greedy-natural", "fisher-least-change"])
def test_a_sparse_repair_changes_only_its_chosen_columns(tiny_llama, small_stat, settings):
    snapshot = WeightSnapshot(tiny_llama.arch)
    result = repair(tiny_llama, [PLANTED], "star", settings, guard=None)
    assert result.fixed, result.reason
    assert 0 < result.neurons <= 24
    for layer in range(tiny_llama.arch.n_layers):
        before, after = snapshot.original[layer], tiny_llama.arch.columns(layer)
        changed = (before != after).any(dim=0).nonzero().flatten().tolist()
        expected = result.patch.layers[layer].columns.tolist() if layer in result.patch.layers else []
        assert changed == expected
    undo(tiny_llama, result)
    for layer in range(tiny_llama.arch.n_layers):
        assert torch.equal(snapshot.original[layer], tiny_llama.arch.columns(layer))


def test_the_same_repair_twice_gives_the_same_patch(tiny_llama, small_stat):
    first = repair(tiny_llama, [PLANTED], "star", TINY, guard=None)
    undo(tiny_llama, first)
    second = repair(tiny_llama, [PLANTED], "star", TINY, guard=None)
    undo(tiny_llama, second)
    assert first.fixed and second.fixed
    assert first.patch.layer_ids == second.patch.layer_ids
    for l in first.patch.layer_ids:
        assert torch.equal(first.patch.layers[l].delta, second.patch.layers[l].delta)


@pytest.mark.parametrize("rule, hook", [("backtrack", "_take_step"), ("minimal", "_minimal_step")])
def test_the_step_rules_never_accept_a_step_that_raises_the_loss(tiny_llama, small_stat, monkeypatch, rule, hook):
    from star_engine.methods.star import method as star_method

    losses = []
    original = getattr(star_method.StarMethod, hook)

    def recording(self, session, problem, layers, neurons, steps, *rest):
        loss = rest[-1]
        out = original(self, session, problem, layers, neurons, steps, *rest)
        with torch.no_grad():
            after = float(self._forward(session, problem, []).loss)
        losses.append((loss, after, out is None))
        return out

    monkeypatch.setattr(star_method.StarMethod, hook, recording)
    result = repair(tiny_llama, [PLANTED], "star", TINY | {"lr": "5.0", "step_rule": rule}, guard=None)   # far too big
    assert losses
    for before, after, gave_up in losses:
        assert after == pytest.approx(before, rel=1e-6) if gave_up else after < before
    if result.fixed:
        undo(tiny_llama, result)


def test_a_broken_or_foreign_statistic_cache_is_rebuilt(tiny_llama, small_stat):
    stat = corpus_statistic(tiny_llama, progress=False)
    path = statistic_path(tiny_llama)
    assert path.is_file()
    good = path.read_bytes()

    def valid_again() -> bool:
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            return meta["model_fingerprint"] != "someone-else" and torch.equal(
                f.get_tensor("layer.0"), stat.second_moment[0])

    def reload():
        tiny_llama.cache.clear()
        return corpus_statistic(tiny_llama, progress=False)

    path.write_bytes(good[: len(good) // 2])                      # truncated
    rebuilt = reload()
    assert valid_again()
    torch.testing.assert_close(rebuilt.second_moment[0], stat.second_moment[0])

    from safetensors.torch import load_file, save_file
    path.write_bytes(good)
    tensors = load_file(str(path))
    save_file(tensors, str(path), metadata={"model_fingerprint": "someone-else"})   # foreign
    reload()
    assert valid_again()


def test_the_statistic_is_a_second_moment(tiny_llama, small_stat):
    stat = corpus_statistic(tiny_llama, progress=False)
    C = stat.dense(1)
    assert stat.second_moment[1].dtype == torch.bfloat16 and torch.equal(stat.diag(1), C.diagonal())
    assert C.shape == (tiny_llama.arch.d_ff,) * 2
    torch.testing.assert_close(C, C.T)
    assert float(torch.linalg.eigvalsh(C.double()).min()) > -1e-3 * float(C.diagonal().max())


def test_each_positions_margin_gradient_is_taken_through_its_own_sequence_alone(tiny_llama):
    from star_engine.capture import encode_case
    from star_engine.methods import get_method
    from star_engine.methods.star import method as star_method
    from star_engine.session import RepairSession

    lm, g = tiny_llama, torch.Generator().manual_seed(3)
    session = RepairSession(lm, [encode_case(lm, PLANTED)])
    inputs = [torch.randint(0, 100, (1, n), generator=g) for n in (9, 13)]
    spans, sizes = [slice(5, 8), slice(8, 12)], [3, 4]
    target = torch.randint(0, 100, (sum(sizes),), generator=g)
    problem = star_method._Problem(inputs, spans, target)
    layers, neurons = [0, 2], {0: torch.tensor([1, 4, 7]), 2: torch.tensor([0, 5])}
    everything = torch.full((len(target),), float("inf"))    # every position constrained
    _, _, J, constrained = get_method("star")._margin_jacobian(session, problem, layers, neurons, everything)
    assert constrained.tolist() == list(range(len(target)))
    p = 0
    for ids, span, t in zip(inputs, spans, target.split(sizes)):
        with session.trainable(layers) as params:
            alone = star_method._soft_margins(lm.model(input_ids=ids).logits[0, span], t)
            for i in range(len(t)):
                for l, grad in zip(layers, torch.autograd.grad(alone[i], params, retain_graph=True)):
                    torch.testing.assert_close(J[l][p], lm.arch.as_columns(l, grad)[:, neurons[l]])
                p += 1


def test_the_output_statistic_is_a_seeded_second_moment_and_a_broken_cache_is_rebuilt(tiny_llama, small_stat, monkeypatch):
    from star_engine import protect
    from star_engine.model import cache_root

    monkeypatch.setattr(protect, "_fisher_spec", lambda lm: CorpusSpec(split="stat", n_tokens=512, window=64))
    R = protect.output_fisher(tiny_llama, progress=False).moments
    d = tiny_llama.arch.d_model
    assert sorted(R) == list(range(tiny_llama.arch.n_layers)) and all(r.shape == (d, d) for r in R.values())
    for r in R.values():
        torch.testing.assert_close(r, r.T)
        assert float(torch.linalg.eigvalsh(r.double()).min()) > -1e-2 * float(r.diagonal().max()) and float(r.trace()) > 0
    [path] = (cache_root() / "stats").glob(f"{tiny_llama.name}-*-output-fisher.safetensors")
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])                      # truncated: recomputed, the same values
    tiny_llama.cache.clear()
    again = protect.output_fisher(tiny_llama, progress=False).moments
    assert all(torch.equal(again[l], R[l]) for l in R)
    tiny_llama.cache.clear()                                      # the rebuilt file is read, not recomputed
    monkeypatch.setattr(protect, "accumulate_output_fisher", lambda *a, **k: pytest.fail("recomputed"))
    assert all(torch.equal(protect.output_fisher(tiny_llama, progress=False).moments[l], R[l]) for l in R)

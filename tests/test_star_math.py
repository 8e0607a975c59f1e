"""The spec's identities (star_method.md §8) checked on tiny random models."""

import torch

from star_engine.locate import neuron_masks
from star_engine.methods.star.solver import min_norm_prior, seme_step
from star_engine.semantic import SemanticBasis, iqr_scaled, semantic_steer


def test_basis_row_is_the_least_squares_solution(tiny_lm):
    basis = SemanticBasis(tiny_lm)
    U = basis.U.double()
    for token in (0, 17, U.shape[0] - 1):
        e = torch.zeros(U.shape[0], dtype=torch.float64)
        e[token] = 1
        expected = torch.linalg.lstsq(U, e[:, None], driver="gelsd").solution[:, 0]
        torch.testing.assert_close(basis.basis(token).double(), expected, rtol=1e-3, atol=1e-6)


def test_basis_folds_the_final_norm_gain(tiny_llama):
    norm = tiny_llama.arch.final_norm()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
    basis = SemanticBasis(tiny_llama)
    torch.testing.assert_close(basis.U, tiny_llama.arch.unembedding() * norm.weight)


def test_steer_is_zero_for_a_right_prediction_and_iqr_scaled_otherwise(tiny_llama):
    assert torch.count_nonzero(semantic_steer(tiny_llama, 5, 5)) == 0
    s = semantic_steer(tiny_llama, 5, 9)
    q25, q75 = torch.quantile(s, torch.tensor([0.25, 0.75]))
    torch.testing.assert_close(q75 - q25, torch.tensor(1.0), rtol=1e-4, atol=1e-4)
    raw = SemanticBasis(tiny_llama).delta(5, 9)
    torch.testing.assert_close(iqr_scaled(raw), s)


def test_one_position_prior_moves_the_ffn_output_by_exactly_the_steer():
    torch.manual_seed(0)
    z, s = torch.randn(1, 128, dtype=torch.float64), torch.randn(1, 64, dtype=torch.float64)
    P = min_norm_prior(z, s)                       # (d, d_ff)
    torch.testing.assert_close(z @ P.T, s)         # z . dW = s
    assert torch.linalg.matrix_rank(P) == 1
    torch.testing.assert_close(P, s.T @ z / (z @ z.T))   # the rank-1 closed form


def test_batch_prior_solves_every_row_with_minimum_norm():
    torch.manual_seed(1)
    Z, S = torch.randn(5, 128, dtype=torch.float64), torch.randn(5, 64, dtype=torch.float64)
    S[2] = 0                                       # a right prediction: its output must not move
    P = min_norm_prior(Z, S)
    torch.testing.assert_close(Z @ P.T, S)
    torch.testing.assert_close((Z @ P.T)[2], torch.zeros(64, dtype=torch.float64))
    expected = torch.linalg.lstsq(Z, S, driver="gelsd").solution.T   # minimum-norm solution
    torch.testing.assert_close(P, expected)


def test_masked_prior_is_zero_outside_the_mask_and_still_solves():
    torch.manual_seed(2)
    z, s = torch.randn(1, 128, dtype=torch.float64), torch.randn(1, 64, dtype=torch.float64)
    mask = torch.zeros(128, dtype=torch.bool)
    mask[::8] = True
    P = min_norm_prior(z, s, mask)
    assert torch.count_nonzero(P[:, ~mask]) == 0
    torch.testing.assert_close(z @ P.T, s)


def test_optimizer_step_is_prior_magnitude_with_descent_sign():
    torch.manual_seed(3)
    W, P, G = torch.randn(8, 16), torch.randn(8, 16), torch.randn(8, 16)
    expected = W + 0.01 * P.abs() * -torch.sign(G)
    seme_step(W, P, G, 0.01)
    torch.testing.assert_close(W, expected, rtol=0, atol=0)


def test_neuron_masks_keep_the_top_scores():
    scores = {0: torch.arange(16.0), 1: torch.arange(16.0) + 100}
    layer = neuron_masks(scores, "layer", 0.25, best_layer=1)
    assert list(layer) == [1] and layer[1].sum() == 4 and layer[1][-4:].all()
    pooled = neuron_masks(scores, "global", 0.25)
    assert pooled[0].sum() == 0 and pooled[1].sum() >= 4


def test_span_logits_are_the_full_passes_logits_at_the_predicting_positions(tiny_lm):
    from star_engine.methods.star.method import _span_logits

    ids = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for span in (slice(7, 11), slice(11, None)):    # batch mode's spans, token mode's last position
            full = tiny_lm.model(input_ids=ids).logits[0, span]
            torch.testing.assert_close(_span_logits(tiny_lm.model, ids, span), full)


def test_problem_logits_batched_with_padding_are_each_sequences_own(tiny_lm, monkeypatch):
    """One padded pass over sequences of different lengths and spans gives every sequence the logits of its own
    pass (causal attention: the padding after a sequence changes nothing before it), in every family."""
    from star_engine.methods.star import method as star_method
    from star_engine.methods.star.method import _problem_logits, _span_logits

    g = torch.Generator().manual_seed(2)
    inputs = [torch.randint(0, 100, (1, n), generator=g) for n in (9, 14, 5)]
    spans = [slice(4, 8), slice(10, 13), slice(2, 4)]
    expected = torch.cat([_span_logits(tiny_lm.model, ids, span) for ids, span in zip(inputs, spans)]).detach()
    torch.testing.assert_close(_problem_logits(tiny_lm.model, inputs, spans), expected, atol=1e-5, rtol=1e-5)
    vocab = tiny_lm.model.config.get_text_config().vocab_size
    monkeypatch.setattr(star_method, "_LOGITS_FLOATS", 12 * vocab)   # one sequence's logits per pass: three passes
    torch.testing.assert_close(_problem_logits(tiny_lm.model, inputs, spans), expected, atol=1e-5, rtol=1e-5)


def test_margin_jacobian_is_each_margins_weight_gradient_at_the_patchable_columns(tiny_lm):
    """The least-change step's Jacobian (one batched backward pass per sequence, through y = W z) against the
    plain way: one backward pass per margin, the full weight gradient, its patchable columns."""
    from types import SimpleNamespace

    from star_engine.methods.star.method import StarMethod, _Problem, _soft_margins, _span_logits

    arch, g = tiny_lm.arch, torch.Generator().manual_seed(1)
    layers = [0, arch.n_layers - 1]
    neurons = {l: torch.randperm(arch.d_ff, generator=g)[:5].sort().values for l in layers}
    inputs = [torch.randint(0, 100, (1, n), generator=g) for n in (9, 6)]
    spans = [slice(4, 8), slice(5, None)]
    problem = _Problem(inputs, spans, torch.randint(0, 100, (5,), generator=g))
    wanted = torch.full((5,), float("inf"))        # every position constrained
    session = SimpleNamespace(arch=arch, lm=tiny_lm)
    _, margins, J, constrained = StarMethod._margin_jacobian(session, problem, layers, neurons, wanted)
    assert constrained.tolist() == [0, 1, 2, 3, 4] and all(J[l].shape == (5, arch.d_model, 5) for l in layers)

    params = [arch.weight(l) for l in layers]
    for p in params:
        p.requires_grad_(True)
    try:
        expected_margins = torch.cat([_soft_margins(_span_logits(tiny_lm.model, ids, span), t)
                                      for ids, span, t in zip(inputs, spans, problem.target.split([4, 1]))])
        torch.testing.assert_close(margins, expected_margins.detach())
        for p_ in range(5):
            grads = torch.autograd.grad(expected_margins[p_], params, retain_graph=True)
            for l, grad in zip(layers, grads):
                torch.testing.assert_close(J[l][p_], arch.as_columns(l, grad)[:, neurons[l]])
    finally:
        for p in params:
            p.requires_grad_(False)

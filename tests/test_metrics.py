"""Benchmark metrics on hand-made cases where the answer is known."""

import pytest
import torch

from star_engine.bench.data import Scored
from star_engine.bench.metrics import CaseOutcome, Score, score, specificity, summarise
from star_engine.capture import token_exact_match


def test_token_exact_match():
    assert token_exact_match([1, 2, 3], [1, 2, 4]) == pytest.approx(2 / 3)
    assert token_exact_match([7], [7]) == 1.0
    assert token_exact_match([0, 0], [1, 2]) == 0.0


def test_specificity_counts_changed_lines_and_loglik_shift():
    before = [Score(1.0, True, -1.0, (1, 2)), Score(1.0, True, -2.0, (3,))]
    assert specificity(before, before) == (1.0, 0.0)
    after = [Score(0.5, False, -1.5, (1, 9)), Score(1.0, True, -1.0, (3,))]
    unchanged, dll = specificity(before, after)
    assert unchanged == 0.5 and dll == pytest.approx((0.5 + 1.0) / 2)
    assert specificity([], []) == (1.0, 0.0)


def test_summary_over_hand_made_outcomes():
    s1 = Score(0.5, False, -1.0)
    s2 = Score(1.0, True, -0.5)
    outcomes = [
        CaseOutcome(True, 0.2, 1.0, 2.0, 10, 2, [s1], [s2], 0.9, 0.1, method_seconds=1.0),
        CaseOutcome(False, 0.4, 0.6, 4.0, 0, 0, [s1, s1], [s1, s1], method_seconds=3.5),
        CaseOutcome(True, 0.0, 1.0, 3.0, 30, 4, [], [], 0.7, 0.3, method_seconds=1.0),
    ]
    r = summarise(outcomes)
    assert r["n_cases"] == 3 and r["n_fixed"] == 2
    assert r["fix_rate"] == pytest.approx(2 / 3)
    assert r["em_before"] == pytest.approx(0.2) and r["em_after"] == pytest.approx(2.6 / 3)
    assert r["seconds_per_case"] == pytest.approx(3.0) and r["method_seconds_per_case"] == pytest.approx(5.5 / 3)
    assert r["neurons_per_case"] == pytest.approx(20) and r["layers_per_case"] == pytest.approx(3)
    g = r["generalization_detail"]
    assert g["n_cases"] == 2 and g["n_prompts"] == 3
    assert g["em_before"] == pytest.approx(0.5) and g["em_after"] == pytest.approx(2 / 3)
    assert g["fix_rate_before"] == 0.0 and g["fix_rate_after"] == pytest.approx(1 / 3)
    assert r["generalization"] == g["em_after"]
    assert r["specificity"] == pytest.approx(0.8)
    assert r["specificity_detail"]["mean_abs_dloglik"] == pytest.approx(0.2)


def test_batched_scores_equal_one_at_a_time(tiny_lm):
    items = [Scored((5, 6, 7), (8, 9)), Scored((10,), (11, 12, 13, 14)), Scored((1, 2, 3, 4, 5, 6), (7,))]
    batched = score(tiny_lm, items)
    for item, b in zip(items, batched):
        [one] = score(tiny_lm, [item])
        assert one.predicted == b.predicted and one.exact == b.exact
        assert one.loglik == pytest.approx(b.loglik, abs=1e-4)
        # against the definition: teacher-forced argmax and mean log-probability
        ids = torch.tensor([list(item.prompt_ids + item.cont_ids)])
        with torch.no_grad():
            lp = tiny_lm.model(input_ids=ids).logits[0].log_softmax(-1)
        start = len(item.prompt_ids) - 1
        rows = lp[start : start + len(item.cont_ids)]
        assert list(one.predicted) == rows.argmax(-1).tolist()
        want = float(rows[torch.arange(len(item.cont_ids)), torch.tensor(item.cont_ids)].mean())
        assert one.loglik == pytest.approx(want, abs=1e-4)
        assert one.em == token_exact_match(one.predicted, item.cont_ids)


def test_a_continuation_that_is_the_models_own_argmax_is_exact(tiny_llama):
    [s] = score(tiny_llama, [Scored((5, 6, 7), (1,))])
    [again] = score(tiny_llama, [Scored((5, 6, 7), s.predicted)])
    assert again.exact and again.em == 1.0


def test_ranking_puts_effectiveness_then_specificity_then_time_first():
    from star_engine.bench.report import ranking

    def row(fix, em, spec, dll, sec):
        return {"fix_rate": fix, "em_after": em, "specificity": spec, "seconds_per_case": sec,
                "specificity_detail": {"mean_abs_dloglik": dll}}

    results = {
        "slow_specific": row(0.9, 1.0, 0.9, 0.1, 9.0),
        "fast_specific": row(0.9, 1.0, 0.9, 0.1, 2.0),
        "leaky": row(0.9, 1.0, 0.5, 0.1, 1.0),
        "fixes_more": row(1.0, 1.0, 0.1, 3.0, 20.0),
        "fixes_none": row(0.0, 0.6, None, None, 1.0),
    }
    assert ranking(results) == ["fixes_more", "fast_specific", "slow_specific", "leaky", "fixes_none"]

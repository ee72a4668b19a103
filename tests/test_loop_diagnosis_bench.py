"""bench/loop_diagnosis.py on a tiny world: the figures it reports, their order by
construction, and the stages it wraps restored afterwards."""

from __future__ import annotations

from bench_module import load_bench


def test_loop_diagnosis_reports_ordered_figures_and_restores_the_stages() -> None:
    from operators import serving
    from operators.trainer import Trainer

    before = (Trainer.process, serving.Server._ranker_scores)
    module = load_bench("loop_diagnosis")
    figures = module.main(["--users", "60", "--items", "50", "--warmup", "800",
                           "--requests", "1200", "--window", "50", "--epochs", "50"])
    assert (Trainer.process, serving.Server._ranker_scores) == before
    assert figures["examples"] > figures["examples_first_half"] > 0
    assert figures["late_requests"] > 0 and figures["sampled_requests"] > 0
    # the best order of the candidates beats the LR's; the oracle's whole catalogue beats both
    assert figures["ectr_oracle"] >= figures["ectr_candidates_best"] >= figures["ectr_lr_copy"]
    assert 0.0 <= figures["recall_oracle_top10"] <= 1.0
    assert 0.0 <= figures["favourite_category_from_clicks"] <= 1.0
    for key in ("ectr_sampled_batch_lr", "ectr_sampled_online_lr", "ectr_sampled_online_numeric_lr",
                "ectr_true_category_and_bias", "ectr_own_click_share_and_bias"):
        assert 0.0 < figures[key] < 1.0

"""Coverage of the Monte Carlo certificate over many seeds (``certificate-coverage``).

A statistical bound is tested by its coverage: over 200 seeds, ``dual_lower <= D(u)`` and
``primal_upper >= F(rho_hat_u)`` must each hold in at least 95 % of the seeds whose bound was
reported (nominal one-sided 2-SE coverage is ~97.7 %; with 200 seeds the binomial standard
deviation of the observed fraction is ~1.1 %, so a correct 97.7 % procedure falls below 95 %
with probability ~1 %, and the seeds are fixed). Where a bound is reported its ESS must be at
least 10 % of the samples. The exact D and F come from the closed form (linear activation) or
from a reference with 100x the samples (tanh).
"""

from __future__ import annotations

import json

import pytest

from mfld.experiments import certificate_coverage as cc


def _check(row):
    assert row["reported"] == row["seeds"], row  # the adapted proposal keeps every seed reportable here
    assert row["cover_lower"] >= 0.95 and row["cover_upper"] >= 0.95, row
    assert row["ess_frac_min"] >= 0.1 and row["pareto_k_max"] <= 0.7, row


def test_coverage_experiment_quick(tmp_path):
    # quick cases: linear d = 5 far from the optimum and d = 20 at it, both at tilt 11.8
    # (|c| = 0.96 lam), and tanh d = 2 at the zero network (tilt ~46)
    summary = cc.run(tmp_path, quick=True)
    assert len(summary["rows"]) == 3
    for row in summary["rows"]:
        _check(row)
        assert row["tilt_value"] >= 10
    assert summary["all_ok"]
    assert (tmp_path / "coverage.png").is_file() and (tmp_path / "coverage.csv").is_file()
    report = (tmp_path / "report.md").read_text()
    assert "every case" in report and "NOT" not in report
    assert json.loads((tmp_path / "summary.json").read_text())["all_ok"] is True


def test_prior_proposal_fails_where_the_adapted_one_holds():
    # the failure mode: plain prior sampling on a strongly tilted linear case. Most
    # seeds are withheld by the diagnostics, and those that slip through do not cover
    # (measured: 15 of 200 reported, 0 % coverage). The study must see that.
    row = cc.coverage(cc.Case("linear", 5, "strong", "far"), seeds=200, proposal="prior")
    assert row["reported"] < row["seeds"]
    assert row["reported"] == 0 or row["cover_lower"] < 0.95 or row["cover_upper"] < 0.95


@pytest.mark.slow
def test_coverage_full_study(tmp_path):
    summary = cc.run(tmp_path, quick=False)
    for row in summary["rows"]:
        _check(row)
    assert summary["all_ok"]

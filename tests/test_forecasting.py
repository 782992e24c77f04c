"""The demo's forecasting domain, tested directly (pure functions)."""

from __future__ import annotations

import pytest

from konstruct.demo import forecasting as fc


def test_data_is_deterministic_per_seed() -> None:
    assert fc.generate_sales(7, 2, 2, 56) == fc.generate_sales(7, 2, 2, 56)
    assert fc.generate_sales(7, 2, 2, 56) != fc.generate_sales(8, 2, 2, 56)
    points, series = fc.count_points(fc.generate_sales(1, 3, 4, 100))
    assert (points, series) == (1200, 12)


def test_weekly_seasonality_and_trend_are_present() -> None:
    table = fc.build_features(fc.generate_sales(3, 2, 2, 364))
    for features in table["features"].values():
        assert features["seasonality"] > 0.2
        assert features["slope"] > 0


def test_backfill_is_continuous_history_before_the_series() -> None:
    sales = fc.generate_sales(5, 1, 1, 70)
    filled = fc.backfill_sales(sales, 28, 5)
    (key,) = sales["series"]
    assert filled["series"][key][28:] == sales["series"][key]
    assert len(filled["series"][key]) == 98
    before, after = filled["series"][key][21:28], sales["series"][key][:7]
    assert abs(sum(before) - sum(after)) / sum(after) < 0.2


@pytest.mark.parametrize("model", sorted(fc.MODELS))
def test_every_model_forecasts_the_horizon(model: str) -> None:
    history = fc.generate_sales(1, 1, 1, 60)["series"]["store0|product0"]
    assert len(fc.forecast(model, fc.fit_series(model, history, {}), 14)) == 14


def test_wape_edges() -> None:
    assert fc.wape([10, 10], [10, 10]) == 0
    assert fc.wape([10, 10], [5, 15]) == pytest.approx(0.5)
    assert fc.wape([0, 0], [0, 0]) == 0


@pytest.mark.parametrize("seed", range(21))
def test_v2_beats_every_baseline(seed: int) -> None:
    table = fc.generate_sales(seed, 2, 2, 182)
    v2, _ = fc.backtest_wape("trend_seasonal_v2", table, {}, 14, 3)
    for baseline in ("naive", "seasonal_naive", "moving_average"):
        score, folds = fc.backtest_wape(baseline, table, {}, 14, 3)
        assert v2 < score, (seed, baseline, v2, score)
        assert folds == 3


def test_artifact_round_trip_and_hash_check() -> None:
    table = fc.generate_sales(2, 1, 2, 60)
    blob = fc.train_and_serialize("moving_average", table, {"window": 3})
    digest = fc.artifact_sha256(blob)
    model = fc.load_model(blob, digest)
    assert model["params"] == {"window": 3} and set(model["fits"]) == set(table["series"])
    with pytest.raises(fc.ArtifactIntegrityError, match=digest):
        fc.load_model(blob + b" ", digest)


def test_artifact_uri_parses_and_the_seed_placeholder_does_not() -> None:
    uri = fc.artifact_uri("seasonal_naive", "0123-4567-89ab-cdef")
    assert uri == "demo/seasonal_naive-model_0123456789ab.joblib"
    assert fc.parse_artifact_key(uri) == "0123456789ab"
    with pytest.raises(ValueError, match="placeholder"):
        fc.parse_artifact_key("demo/safer-promote-placeholder.joblib")
    with pytest.raises(ValueError):
        fc.artifact_uri("naive", "not-hex-at-all")


def test_scenarios_follow_price_elasticity_and_promotions() -> None:
    table = fc.generate_sales(4, 2, 1, 84)
    model = fc.load_model(
        blob := fc.train_and_serialize("trend_seasonal_v2", table, {}), fc.artifact_sha256(blob)
    )
    outcomes = {o["name"]: o for o in fc.simulate_default_plans(model, table, 28)}
    base = outcomes["baseline"]["total_units"]
    assert outcomes["price_rise"]["total_units"] < base < outcomes["price_cut"]["total_units"]
    assert outcomes["promo_week"]["total_units"] == pytest.approx(base * 1.12, rel=1e-4)
    comparison = fc.compare_plans(list(outcomes.values()))
    assert comparison["best"] == "promo_week" and comparison["ranking"][-1] == "price_rise"


def test_compatibility_names_the_difference() -> None:
    ok = fc.compatibility_check(
        {"name": "a", "model": "naive", "artifact_uri": "demo/naive-model_0123456789ab.joblib"},
        {"name": "b", "model": "trend_seasonal_v2", "artifact_uri": "x/b.joblib"},
    )
    assert ok["compatible"] is True
    bad = fc.compatibility_check(
        {"name": "a", "model": "naive", "artifact_uri": "demo/a.joblib"},
        {"name": "b", "model": "prophet", "artifact_uri": "demo/b.txt"},
    )
    assert bad["compatible"] is False and "prophet" in bad["detail"]

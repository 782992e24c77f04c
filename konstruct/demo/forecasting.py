"""The forecasting domain of the demo: data, models, backtests, artifacts, scenarios.

Pure standard-library Python and deterministic given a seed, so activities can
run it anywhere and tests can check it directly. Tables are JSON-friendly:
`{"series": {"store|product": [daily units, ...]}}`.

Artifacts are canonical JSON, not pickle/joblib: loading one never executes
code. The file keeps the `.joblib` suffix only because the registry's URI
format (`demo/{model}-model_{hex12}.joblib`) demands it.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections.abc import Callable
from typing import Any

from konstruct.platform.errors import ArtifactIntegrityError

Table = dict[str, Any]
Params = dict[str, Any]

ARTIFACT_KEY_PATTERN = re.compile(r"model_([0-9a-f]+)(?:\.joblib)?$")
WEEK = 7
# Weekday multipliers (Monday first): a weekend peak, as retail sales have.
WEEKDAY_SHAPE = (0.86, 0.9, 0.95, 1.0, 1.12, 1.22, 0.95)
PRICE_ELASTICITY = -1.5


# --- data ---------------------------------------------------------------


def _series_params(seed: int, store: int, product: int) -> tuple[float, float, float]:
    rng = random.Random(f"{seed}|{store}|{product}")
    base = rng.uniform(40, 120)
    trend = rng.uniform(0.02, 0.12)  # units per day
    noise = rng.uniform(0.03, 0.07)  # multiplicative
    return base, trend, noise


def _day_value(base: float, trend: float, noise: float, day: int, rng: random.Random) -> float:
    level = base + trend * day
    value = level * WEEKDAY_SHAPE[day % WEEK] * (1 + rng.gauss(0, noise))
    return round(max(value, 0.0), 2)


def generate_sales(seed: int, stores: int, products: int, days: int) -> Table:
    """Daily units per store/product: level + linear trend, weekly shape, noise."""
    series: dict[str, list[float]] = {}
    for store in range(stores):
        for product in range(products):
            base, trend, noise = _series_params(seed, store, product)
            rng = random.Random(f"{seed}|{store}|{product}|main")
            series[f"store{store}|product{product}"] = [
                _day_value(base, trend, noise, day, rng) for day in range(days)
            ]
    return {"series": series, "seed": seed, "start_day": 0}


def backfill_sales(sales: Table, days: int, seed: int) -> Table:
    """Prepend `days` of history drawn from the same series parameters (continuous)."""
    series: dict[str, list[float]] = {}
    for key, values in sales["series"].items():
        store, product = (
            int(part.removeprefix("store").removeprefix("product")) for part in key.split("|")
        )
        base, trend, noise = _series_params(seed, store, product)
        rng = random.Random(f"{seed}|{store}|{product}|backfill")
        history = [_day_value(base, trend, noise, day, rng) for day in range(-days, 0)]
        series[key] = history + list(values)
    return {**sales, "series": series, "start_day": sales.get("start_day", 0) - days}


def count_points(table: Table) -> tuple[int, int]:
    """(points, series)."""
    return sum(len(v) for v in table["series"].values()), len(table["series"])


def build_features(sales: Table) -> Table:
    """The series plus per-series weekday profile and trend, the models' inputs."""
    features = {}
    for key, values in sales["series"].items():
        intercept, slope = _linear_fit(values)
        weekday_means = [_mean(values[d::WEEK]) for d in range(WEEK)]
        overall = _mean(values) or 1.0
        features[key] = {
            "slope": round(slope, 5),
            "seasonality": round((max(weekday_means) - min(weekday_means)) / overall, 4),
        }
    return {**sales, "features": features}


# --- models -------------------------------------------------------------


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _linear_fit(values: list[float]) -> tuple[float, float]:
    n = len(values)
    if n < 2:
        return (values[0] if values else 0.0), 0.0
    mean_x = (n - 1) / 2
    mean_y = _mean(values)
    sxx = sum((x - mean_x) ** 2 for x in range(n))
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in enumerate(values))
    slope = sxy / sxx
    return mean_y - slope * mean_x, slope


def _fit_naive(history: list[float], _params: Params) -> Params:
    return {"last": history[-1]}


def _forecast_naive(fit: Params, horizon: int) -> list[float]:
    return [fit["last"]] * horizon


def _fit_seasonal_naive(history: list[float], params: Params) -> Params:
    period = int(params.get("period", WEEK))
    return {"season": history[-period:], "period": period}


def _forecast_seasonal_naive(fit: Params, horizon: int) -> list[float]:
    return [fit["season"][i % fit["period"]] for i in range(horizon)]


def _fit_moving_average(history: list[float], params: Params) -> Params:
    window = int(params.get("window", WEEK))
    return {"mean": _mean(history[-window:])}


def _forecast_moving_average(fit: Params, horizon: int) -> list[float]:
    return [fit["mean"]] * horizon


def _fit_trend_seasonal(history: list[float], _params: Params) -> Params:
    """Additive linear trend (least squares) plus weekday offsets from the detrended data."""
    intercept, slope = _linear_fit(history)
    residuals = [y - (intercept + slope * x) for x, y in enumerate(history)]
    n = len(history)
    # Offsets indexed by the position within the week relative to the series start.
    offsets = [_mean(residuals[d::WEEK]) for d in range(WEEK)]
    return {"intercept": intercept, "slope": slope, "n": n, "offsets": offsets}


def _forecast_trend_seasonal(fit: Params, horizon: int) -> list[float]:
    n = fit["n"]
    return [
        max(0.0, fit["intercept"] + fit["slope"] * (n + i) + fit["offsets"][(n + i) % WEEK])
        for i in range(horizon)
    ]


MODELS: dict[
    str, tuple[Callable[[list[float], Params], Params], Callable[[Params, int], list[float]]]
] = {
    "naive": (_fit_naive, _forecast_naive),
    "seasonal_naive": (_fit_seasonal_naive, _forecast_seasonal_naive),
    "moving_average": (_fit_moving_average, _forecast_moving_average),
    "trend_seasonal_v2": (_fit_trend_seasonal, _forecast_trend_seasonal),
}


def _model(
    name: str,
) -> tuple[Callable[[list[float], Params], Params], Callable[[Params, int], list[float]]]:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    return MODELS[name]


def fit_series(model: str, history: list[float], params: Params) -> Params:
    return _model(model)[0](history, params)


def forecast(model: str, fit: Params, horizon: int) -> list[float]:
    return _model(model)[1](fit, horizon)


# --- evaluation ---------------------------------------------------------


def wape(actual: list[float], predicted: list[float]) -> float:
    """Weighted absolute percentage error as a fraction: sum|a-p| / sum|a|."""
    total = sum(abs(a) for a in actual)
    error = sum(abs(a - p) for a, p in zip(actual, predicted, strict=True))
    if total == 0:
        return 0.0 if error == 0 else math.inf
    return error / total


def backtest_wape(
    model: str, table: Table, params: Params, horizon: int, folds: int
) -> tuple[float, int]:
    """Rolling-origin backtest: fold k trains on everything before its origin.

    Returns the WAPE pooled over every series and fold, and the folds used.
    """
    error = total = 0.0
    for fold in range(folds):
        for values in table["series"].values():
            origin = len(values) - horizon * (folds - fold)
            if origin < 2 * WEEK:
                raise ValueError(f"series too short for {folds} folds of {horizon} days")
            predicted = forecast(model, fit_series(model, values[:origin], params), horizon)
            actual = values[origin : origin + horizon]
            error += sum(abs(a - p) for a, p in zip(actual, predicted, strict=True))
            total += sum(abs(a) for a in actual)
    return (error / total if total else 0.0), folds


def sweep_configs(preset: str) -> list[dict[str, Any]]:
    presets = {
        "moving_average_windows": [
            {"model": "moving_average", "params": {"window": w}} for w in (3, 7, 14, 28)
        ],
        "seasonal_periods": [
            {"model": "seasonal_naive", "params": {"period": p}} for p in (7, 14, 28)
        ],
    }
    if preset not in presets:
        raise ValueError(f"unknown sweep preset {preset!r}; known: {sorted(presets)}")
    return presets[preset]


# --- artifacts ----------------------------------------------------------


def train_and_serialize(model: str, table: Table, params: Params) -> bytes:
    """Fit every series; the artifact is canonical JSON (sorted keys, UTF-8)."""
    fits = {key: fit_series(model, values, params) for key, values in table["series"].items()}
    document = {"format": "konstruct-forecast/1", "model": model, "params": params, "fits": fits}
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def artifact_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def artifact_uri(model: str, key: str) -> str:
    """`demo/{model}-model_{hex12}.joblib`; `key` is a hash or a run id (dashes dropped)."""
    hex12 = key.replace("-", "").lower()[:12]
    if not re.fullmatch(r"[0-9a-f]{12}", hex12):
        raise ValueError(f"artifact key {key!r} does not give 12 hex characters")
    return f"demo/{model}-model_{hex12}.joblib"


def parse_artifact_key(uri: str) -> str:
    match = ARTIFACT_KEY_PATTERN.search(uri)
    if not match:
        raise ValueError(f"Cannot parse artifact-key from {uri!r} (expected ...model_<hex>.joblib)")
    return match.group(1)


def load_model(blob: bytes, expected_sha256: str) -> dict[str, Any]:
    actual = artifact_sha256(blob)
    if actual != expected_sha256:
        raise ArtifactIntegrityError(
            f"artifact hash mismatch: expected {expected_sha256}, got {actual}"
        )
    document = json.loads(blob)
    if document.get("format") != "konstruct-forecast/1" or document.get("model") not in MODELS:
        raise ValueError("artifact is not a Konstruct forecast model")
    return dict(document)


def compatibility_check(run_a: dict[str, Any], run_b: dict[str, Any]) -> dict[str, Any]:
    """Two runs are comparable when both are model files of a known model type.

    Their series keys and horizon are not compared here: the demo trains every
    run from one feature table, and the artifacts carry no horizon.
    """
    differences = []
    for run in (run_a, run_b):
        uri = str(run.get("artifact_uri") or "")
        if not uri.endswith(".joblib"):
            differences.append(f"{run.get('name')}: artifact {uri!r} is not a model file")
        if run.get("model") not in MODELS:
            differences.append(f"{run.get('name')}: unknown model {run.get('model')!r}")
    if differences:
        return {"compatible": False, "detail": "; ".join(differences)}
    return {"compatible": True, "detail": "both are model files of known model types"}


# --- scenarios ----------------------------------------------------------

DEFAULT_PLANS: tuple[dict[str, Any], ...] = (
    {"name": "baseline", "price_change_pct": 0.0, "promo_uplift_pct": 0.0},
    {"name": "promo_week", "price_change_pct": 0.0, "promo_uplift_pct": 12.0},
    {"name": "price_cut", "price_change_pct": -5.0, "promo_uplift_pct": 0.0},
    {"name": "price_rise", "price_change_pct": 4.0, "promo_uplift_pct": 0.0},
)


def plan_multiplier(price_change_pct: float, promo_uplift_pct: float) -> float:
    """Volume multiplier: constant price elasticity, then the promotion's uplift."""
    price_effect = (1 + price_change_pct / 100) ** PRICE_ELASTICITY
    return price_effect * (1 + promo_uplift_pct / 100)


def simulate_plan(model: dict[str, Any], horizon: int, plan: dict[str, Any]) -> dict[str, Any]:
    name = model["model"]
    baseline_by_series = {
        key: sum(forecast(name, fit, horizon)) for key, fit in model["fits"].items()
    }
    lift = plan_multiplier(plan["price_change_pct"], plan["promo_uplift_pct"])
    baseline_total = sum(baseline_by_series.values())
    return {
        **plan,
        "horizon": horizon,
        "lift": round(lift, 6),
        "baseline_units": round(baseline_total, 2),
        "total_units": round(baseline_total * lift, 2),
        "delta_pct": round((lift - 1) * 100, 3),
        "by_series": {k: round(v * lift, 2) for k, v in baseline_by_series.items()},
    }


def simulate_default_plans(
    model: dict[str, Any], table: Table, horizon: int
) -> list[dict[str, Any]]:
    """Each default plan forecast from the loaded model; `table` must be what it was fitted on."""
    missing = set(model["fits"]) ^ set(table["series"])
    if missing:
        raise ValueError(f"model and data disagree on series: {sorted(missing)[:5]}")
    return [simulate_plan(model, horizon, plan) for plan in DEFAULT_PLANS]


def compare_plans(outcomes: list[dict[str, Any]]) -> dict[str, Any]:
    ranked = sorted(outcomes, key=lambda o: (-float(o["total_units"]), o["name"]))
    return {
        "ranking": [o["name"] for o in ranked],
        "best": ranked[0]["name"],
        "spread_units": round(
            float(ranked[0]["total_units"]) - float(ranked[-1]["total_units"]), 2
        ),
    }

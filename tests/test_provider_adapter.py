"""The retry posture of each provider exception, on litellm's own exception classes."""

from __future__ import annotations

import subprocess
import sys

import httpx
import litellm
import pytest

from konstruct.providers.adapter import classify, provider_error
from tests.support import ROOT, SIMULATOR_TEST_KEY, SimulatorProcess

QUOTA_BODY = (
    '{"error": {"message": "You exceeded your current quota, please check your plan",'
    ' "type": "insufficient_quota", "code": "insufficient_quota"}}'
)


def _response(status: int, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(status, headers=headers, request=httpx.Request("POST", "http://sim/v1"))


@pytest.mark.parametrize(
    ("error", "posture", "retry_after_s"),
    [
        (
            litellm.RateLimitError(
                "rate limit exceeded",
                "openai",
                "m",
                response=_response(429, {"retry-after": "2"}),
            ),
            "throttled",
            2.0,
        ),
        (
            # OpenAI's window limits answer with x-ratelimit-* and no Retry-After.
            litellm.RateLimitError(
                "Rate limit reached for m on requests",
                "openai",
                "m",
                response=_response(
                    429,
                    {
                        "x-ratelimit-remaining-requests": "0",
                        "x-ratelimit-reset-requests": "1.5s",
                        "x-ratelimit-remaining-tokens": "9000",
                        "x-ratelimit-reset-tokens": "6m0s",
                    },
                ),
            ),
            "throttled",
            1.5,
        ),
        (
            litellm.RateLimitError(QUOTA_BODY, "openai", "m", response=_response(429)),
            "quota",
            None,
        ),
        (
            # What litellm keeps of OpenAI's quota answer: the message alone.
            litellm.RateLimitError(
                "You exceeded your current quota, please check your plan and billing details.",
                "openai",
                "m",
                response=_response(429),
            ),
            "quota",
            None,
        ),
        (litellm.BadRequestError("bad", "m", "openai"), "rejected", None),
        (
            litellm.InternalServerError("boom", "openai", "m", response=_response(500)),
            "failed",
            None,
        ),
    ],
    ids=["429", "429-window-headers", "quota-body", "quota-message", "400", "500"],
)
def test_each_exception_has_one_posture(
    error: Exception, posture: str, retry_after_s: float | None
) -> None:
    failure = classify(error)
    assert (failure.posture, failure.retry_after_s) == (posture, retry_after_s)


def test_a_spent_quota_is_never_retried_but_a_429_is() -> None:
    quota = litellm.RateLimitError(QUOTA_BODY, "openai", "m", response=_response(429))
    limited = litellm.RateLimitError("slow down", "openai", "m", response=_response(429))
    assert provider_error(quota, "call").non_retryable is True
    assert provider_error(limited, "call").non_retryable is False


def call_in_a_fresh_interpreter(
    simulator: SimulatorProcess, api_key: str, lines: list[str]
) -> subprocess.CompletedProcess[str]:
    """Run `lines` in a new Python process (as the worker is one) after they set up a
    call: `complete_on`, `params` for the simulator's fast model with `api_key`, and
    `turns`."""
    base = simulator.url + "/v1"
    setup = [
        "import asyncio, logging",
        "from konstruct.providers.adapter import complete_on",
        f"params = {{'model': 'openai/sim-fast', 'api_base': {base!r}, 'api_key': {api_key!r}}}",
        "turns = [{'role': 'user', 'content': 'hi'}]",
    ]
    return subprocess.run(
        [sys.executable, "-c", "\n".join(setup + lines)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def test_a_mapped_error_prints_no_litellm_banner(simulator: SimulatorProcess) -> None:
    """litellm prints "Give Feedback / Get Help" before every exception it maps unless
    told not to; worker logs and bench output carry each error once, in our words.
    A fresh interpreter: a Router built earlier in this session turns it off globally."""
    done = call_in_a_fresh_interpreter(
        simulator,
        "sk-no",
        [
            "try:",
            "    asyncio.run(complete_on(params, turns, timeout_s=30))",
            "except Exception as exc:",
            "    print('raised', type(exc).__name__)",
        ],
    )
    assert "raised AuthenticationError" in done.stdout, done.stdout + done.stderr
    assert "Give Feedback" not in done.stdout + done.stderr


def test_a_call_logs_no_line_of_litellm_in_a_process_logging_at_info(
    simulator: SimulatorProcess,
) -> None:
    """The worker logs at INFO; litellm's loggers have no level of their own, so each
    call logged "LiteLLM completion() model= …" (twice: its handler and the root's),
    a line per call in worker.log and 8 % of the worker's CPU."""
    done = call_in_a_fresh_interpreter(
        simulator,
        SIMULATOR_TEST_KEY,
        [
            "logging.basicConfig(level=logging.INFO)",
            "print('answered', bool(asyncio.run(complete_on(params, turns, timeout_s=30)).content))",
            "logging.getLogger('LiteLLM').warning('warnings still show')",
        ],
    )
    assert "answered True" in done.stdout, done.stdout + done.stderr
    assert "completion() model=" not in done.stdout + done.stderr
    assert "warnings still show" in done.stderr

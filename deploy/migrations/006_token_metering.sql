-- Declared and announced limits, and token metering.
--
-- declared_rate / token_rate: requests and tokens a second from the router
-- config's `model_info.rpm` / `tpm`; header_rate / header_token_rate: what the
-- provider's own x-ratelimit-limit-* headers announce, over `limit_window_s`
-- (60: a minute). A declared limit wins over an announced one (the window of a
-- header is an assumption, the config is what the user knows). The rate never
-- goes above max_rate nor the announced limit; calls are paced by tokens at the
-- token rate (neither known: tokens are not metered).
alter table provider_limits
    add column declared_rate     double precision,
    add column token_rate        double precision,
    add column header_rate       double precision,
    add column header_token_rate double precision,
    add column limit_window_s    double precision not null default 60;

-- The token clock beside the request clock: each call books its estimated
-- prompt + completion tokens, and its answer settles the difference.
alter table provider_schedule
    add column next_token_at double precision not null default 0;

-- Cost, the output cache and budgets (issue 13).
--
-- Money is in US dollars (double precision); a price comes from the router
-- config's `model_info.input_cost_per_token` / `output_cost_per_token`, else
-- litellm's bundled price map, else it is unknown (cost null, counted as 0).

-- Per experiment: the cache switch, its budget and what its calls spent and hold.
-- A call reserves its estimated cost and tokens before it goes out
-- (`spent + reserved + estimate <= max`, one update) and settles after it
-- (the reservation released, the real usage added), so calls in flight can
-- overshoot a budget by at most what they use beyond their estimates.
alter table experiments
    add column cache                    boolean not null default true,
    -- budget.max_usd / max_tokens of the input plus every `resume --raise-budget` /
    -- `--raise-tokens` (the raises, kept apart, survive a restart of the experiment)
    add column budget_max_usd           double precision check (budget_max_usd > 0),
    add column budget_max_tokens        bigint check (budget_max_tokens > 0),
    add column budget_raised_usd        double precision not null default 0,
    add column budget_raised_tokens     bigint not null default 0,
    add column spent_usd                double precision not null default 0,
    add column spent_tokens             bigint not null default 0,
    add column reserved_usd             double precision not null default 0,
    add column reserved_tokens          bigint not null default 0,
    -- Why the experiment paused itself (a spent budget), until it is resumed.
    add column paused_reason            text,
    -- What calls in flight had reserved when a reservation was refused (the
    -- largest such figure until the resume): the bound on the overshoot.
    add column reserved_at_pause_usd    double precision,
    add column reserved_at_pause_tokens bigint;

-- Per result: what the task call and the judges cost, and what the cache saved.
alter table experiment_results
    -- the task call's cost; null: its price is unknown; 0: answered from the cache
    add column cost_usd          double precision default 0,
    -- every llm_judge call of the item, summed (each judge's own in its score entry)
    add column judge_cost_usd    double precision not null default 0,
    add column judge_cost_known  boolean not null default true,
    -- the task output came from the cache
    add column cached            boolean not null default false,
    -- calls of the item answered from the cache (task and judges), and what they
    -- cost when they were made
    add column cache_hits        integer not null default 0,
    add column saved_usd         double precision not null default 0;

-- The output cache: key = sha256 over (kind, deployment id, messages, temperature,
-- max_tokens, epoch); see konstruct/store/cache.py. Only successful calls are stored.
create table llm_cache (
    tenant_id          text not null references tenants (tenant_id) on delete cascade,
    key                text not null,
    kind               text not null check (kind in ('task', 'judge')),
    deployment_id      text not null,
    output             text not null,
    model              text,
    prompt_tokens      integer not null default 0,
    completion_tokens  integer not null default 0,
    -- what the call cost (null: its price was unknown)
    cost_usd           double precision,
    created_at         timestamptz not null default now(),
    primary key (tenant_id, key)
);

-- A tenant's monthly budget, one row per month (the first of the month, UTC).
-- A month without a row takes the max of the latest month before it.
create table tenant_budgets (
    tenant_id     text not null references tenants (tenant_id) on delete cascade,
    month         date not null check (extract(day from month) = 1),
    max_usd       double precision not null check (max_usd > 0),
    spent_usd     double precision not null default 0,
    reserved_usd  double precision not null default 0,
    updated_at    timestamptz not null default now(),
    primary key (tenant_id, month)
);

call konstruct_isolate_tenant(array['llm_cache', 'tenant_budgets']);

-- Experiments: the experiment, its items and one result per item; and the
-- provider state every worker shares (adaptive rate, circuit breaker).

create table experiments (
    tenant_id        text not null references tenants (tenant_id) on delete cascade,
    experiment_id    text not null,
    name             text not null,
    -- task, evals, dataset source and the digest of its items: a restart with
    -- a different spec under the same id is refused.
    spec             jsonb not null,
    spec_digest      text not null,
    workflow_id      text not null,
    status           text not null default 'running',
    -- Set while the experiment is stopping/stopped: a call that starts then
    -- makes no provider request.
    stop_requested   boolean not null default false,
    total            integer not null default 0,
    -- provider answers to this experiment's calls: 429s and failures (5xx,
    -- timeouts), counted by the calls themselves
    throttled        bigint not null default 0,
    call_failures    bigint not null default 0,
    summary          jsonb,
    registry_run_id  uuid,
    created_at       timestamptz not null default now(),
    updated_at       timestamptz not null default now(),
    completed_at     timestamptz,
    primary key (tenant_id, experiment_id)
);
create index experiments_created on experiments (tenant_id, created_at);

create table experiment_items (
    tenant_id      text not null,
    experiment_id  text not null,
    item_id        text not null,
    seq            integer not null,
    input          text not null,
    expected       jsonb,
    metadata       jsonb not null default '{}',
    primary key (tenant_id, experiment_id, item_id),
    unique (tenant_id, experiment_id, seq),
    foreign key (tenant_id, experiment_id)
        references experiments (tenant_id, experiment_id) on delete cascade
);

-- One row per item, written once (insert ... on conflict do nothing): a retried
-- or repeated call never adds a second result.
create table experiment_results (
    tenant_id          text not null,
    experiment_id      text not null,
    item_id            text not null,
    seq                integer not null,
    status             text not null check (status in ('ok', 'failed')),
    output             text,
    -- eval name -> {"score", "passed", "detail"}
    scores             jsonb not null default '{}',
    -- every eval (judges included) has a score
    evaluated          boolean not null default false,
    latency_ms         double precision,
    model              text,
    deployment_id      text,
    provider           text,
    prompt_tokens      integer not null default 0,
    completion_tokens  integer not null default 0,
    error_kind         text,
    error              text,
    attempt            integer not null default 1,
    created_at         timestamptz not null default now(),
    updated_at         timestamptz not null default now(),
    primary key (tenant_id, experiment_id, item_id),
    foreign key (tenant_id, experiment_id, item_id)
        references experiment_items (tenant_id, experiment_id, item_id) on delete cascade
);
create index experiment_results_seq on experiment_results (tenant_id, experiment_id, seq);

call konstruct_isolate_tenant(array['experiments', 'experiment_items', 'experiment_results']);

-- Provider state is not tenant data: one rate and one breaker per provider,
-- shared by every experiment of every tenant on a task queue. Times are epoch
-- seconds on the database clock, so every worker agrees on them.
create table provider_limits (
    task_queue        text not null,
    provider          text not null,
    rate              double precision not null,
    initial_rate      double precision not null,
    min_rate          double precision not null,
    max_rate          double precision not null,
    -- the accepted rate measured at the last 429
    ceiling           double precision,
    changed_at        double precision not null,
    ok_since_change   integer not null default 0,
    last_decrease_at  double precision,
    hold_until        double precision not null default 0,
    step              double precision not null default 0,
    ok_total          bigint not null default 0,
    throttled_total   bigint not null default 0,
    failure_total     bigint not null default 0,
    version           bigint not null default 0,
    updated_at        timestamptz not null default now(),
    primary key (task_queue, provider)
);

create table provider_breakers (
    task_queue            text not null,
    provider              text not null,
    status                text not null default 'closed'
                              check (status in ('closed', 'open', 'half_open')),
    consecutive_failures  integer not null default 0,
    opened_at             double precision,
    probe_started_at      double precision,
    trips                 integer not null default 0,
    last_error            text,
    version               bigint not null default 0,
    updated_at            timestamptz not null default now(),
    primary key (task_queue, provider)
);

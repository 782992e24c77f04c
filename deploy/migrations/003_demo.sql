-- DemoCascade: idempotent alias moves and one row per demo run.

-- A move carries the id its workflow chose before making it, so a retried
-- activity finds the move it already made, and a compensation can undo exactly
-- that move (and only if nobody moved the alias since).
alter table registry_alias_history add column move_id text;
create unique index registry_alias_history_move
    on registry_alias_history (tenant_id, move_id) where move_id is not null;

-- One row per DemoCascade run. `reset` deletes only the demo-owned rows of runs
-- that are no longer running, so two demo runs at once never delete each
-- other's data; `champion_run_id` is the champion the run recorded.
create table demo_sessions (
    tenant_id             text not null references tenants (tenant_id) on delete cascade,
    workflow_run_id       text not null,
    workflow_id           text not null,
    scenario              text not null,
    seed                  bigint not null,
    status                text not null default 'running',
    -- Where demo-production pointed, and its last history id, when the run began.
    pre_run_alias_run_id  uuid,
    history_mark          bigint not null default 0,
    champion_run_id       uuid,
    decision              text,
    started_at            timestamptz not null default now(),
    finished_at           timestamptz,
    primary key (tenant_id, workflow_run_id)
);
create index demo_sessions_status on demo_sessions (tenant_id, status, started_at);

call konstruct_isolate_tenant(array['demo_sessions']);

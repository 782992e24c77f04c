-- When the 429s and failed provider calls of an experiment happened (issue 13's
-- report plots them over time). `experiments.throttled` / `call_failures` keep
-- the totals; this keeps them per second, one upsert per counted call (the same
-- transaction as the total), so the report's timeline adds up to the totals.
create table experiment_retry_seconds (
    tenant_id      text not null,
    experiment_id  text not null,
    at             timestamptz not null,
    throttled      integer not null default 0,
    call_failures  integer not null default 0,
    primary key (tenant_id, experiment_id, at),
    foreign key (tenant_id, experiment_id)
        references experiments (tenant_id, experiment_id) on delete cascade
);

call konstruct_isolate_tenant(array['experiment_retry_seconds']);

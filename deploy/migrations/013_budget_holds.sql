-- A budget reservation per call in flight, with a lease (issue 22).
--
-- `experiments.reserved_*` and `tenant_budgets.reserved_usd` stay the sums a
-- reservation checks against in one update; each call's share is also a row
-- here, renewed by the worker that holds it while the call runs. A call that
-- ends deletes its row (and takes its share off the sums); a row whose lease
-- ran out was held by a worker that died, and the next reservation of its
-- experiment deletes it and gives its share back
-- (konstruct/experiments/store/budgets.py).
create table budget_holds (
    hold_id        bigint generated always as identity primary key,
    tenant_id      text not null references tenants (tenant_id) on delete cascade,
    experiment_id  text not null,
    usd            double precision not null,
    tokens         bigint not null,
    -- the tenant budget's month it is also held in (null: the tenant has none)
    month          date,
    expires_at     timestamptz not null
);
create index budget_holds_by_experiment on budget_holds (tenant_id, experiment_id, expires_at);

call konstruct_isolate_tenant(array['budget_holds']);

-- The provider's call schedule (GCRA): the database-clock time of its next free
-- call slot. Every call books its slot here, so a provider's rate holds across
-- worker processes, experiments and batches alike. A table of its own, so
-- booking a slot never waits behind the counters of `provider_limits`.
create table provider_schedule (
    task_queue    text not null,
    provider      text not null,
    next_slot_at  double precision not null default 0,
    primary key (task_queue, provider),
    foreign key (task_queue, provider)
        references provider_limits (task_queue, provider) on delete cascade
);

insert into provider_schedule (task_queue, provider)
    select task_queue, provider from provider_limits;

-- Slow start: the rate doubles per half second until the first 429 (and again
-- once the provider's limit is seen to rise); after it, it grows additively.
alter table provider_limits
    add column slow_start boolean not null default true;

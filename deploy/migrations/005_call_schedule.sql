-- The provider's call schedule (GCRA): the database-clock time of its next free
-- call slot. Every call books its slot here, so a provider's rate holds across
-- worker processes, experiments and batches alike.
alter table provider_limits
    add column next_slot_at double precision not null default 0;

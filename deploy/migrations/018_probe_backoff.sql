-- Seconds at the learned ceiling before the next probe above it: doubled by each
-- probe that finds the same limit (konstruct/providers/control.py,
-- `probe_after_max_s`); 0 means the first wait, `probe_after_s`.
alter table provider_limits add column probe_wait_s float8 not null default 0;

-- Agent experiments (issue 24): an item run through a tenant's agent keeps its
-- transcript (each turn's steps, tool calls and their results) with its result,
-- under the same row-level security as the rest of the row.
alter table experiment_results add column transcript jsonb;

-- A result is looked up by its item (the primary key). The (tenant, experiment, seq)
-- index competed with the key on every such lookup, and on a table not yet
-- analysed (a new install's first experiments) the planner took it, the smaller,
-- and read every result of the experiment for each one: the last pass over 3,000
-- items read 2.8 million buffers in 1.2 s. Results in dataset order sort on read.
drop index if exists experiment_results_seq;
-- Items are looked up by their key or their place (seq); nothing looks them up by
-- base_id, and that index was taken for item_id lookups the same way.
drop index if exists experiment_items_base;

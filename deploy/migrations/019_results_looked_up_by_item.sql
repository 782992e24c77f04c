-- A result is looked up by its item (the primary key). The (tenant, experiment, seq)
-- index competed with the key on every such lookup, and on a table not yet
-- analysed (a new install's first experiments) the planner took it, the smaller,
-- and read every result of the experiment for each one: the last pass over 3,000
-- items read 2.8 million buffers in 1.2 s. Results in dataset order sort on read.
drop index if exists experiment_results_seq;
-- Items are looked up by their key or their place (seq); nothing looks them up by
-- base_id, and that index was taken for item_id lookups the same way.
drop index if exists experiment_items_base;
-- A result's reference to its item is checked on every insert by a query on the
-- item's columns. Through (tenant, experiment, item_id) that query tied with the
-- (tenant, experiment, seq) key and, the tables not yet analysed, read the
-- experiment's items for each result (0.23 ms an insert, a quarter of
-- PostgreSQL's time in a 3,000-item run). The reference names the item's seq
-- too: whichever key the check takes, it is exact.
alter table experiment_items
    add constraint experiment_items_seq_item unique (tenant_id, experiment_id, seq, item_id);
do $$
declare
    name text;
begin
    for name in
        select conname from pg_constraint
        where conrelid = 'experiment_results'::regclass and contype = 'f'
          and confrelid = 'experiment_items'::regclass
    loop
        execute format('alter table experiment_results drop constraint %I', name);
    end loop;
end $$;
alter table experiment_results
    add constraint experiment_results_item_fkey
    foreign key (tenant_id, experiment_id, seq, item_id)
    references experiment_items (tenant_id, experiment_id, seq, item_id) on delete cascade;

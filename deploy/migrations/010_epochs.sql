-- Epochs: an experiment may run each dataset item N times. Each run of an item
-- is its own experiment item (`item_id` "<id>@<epoch>" when epochs > 1), so a
-- result is unique per (item, epoch) and everything keyed by item_id works as
-- before; `base_id` is the dataset's id, `epoch` counts from 1.
alter table experiment_items
    add column base_id text,
    add column epoch   int not null default 1 check (epoch >= 1);
update experiment_items set base_id = item_id where base_id is null;
alter table experiment_items alter column base_id set not null;
create index experiment_items_base on experiment_items (tenant_id, experiment_id, base_id);

alter table experiments add column epochs int not null default 1 check (epochs >= 1);

-- Foundation: tenants, agents, threads and turns, and the model registry.
-- Every tenant table is under row-level security keyed on the transaction-local
-- setting `konstruct.tenant_id`; the application role has no BYPASSRLS, and
-- FORCE makes the policies apply to the table owner too.

create table tenants (
    tenant_id   text primary key check (tenant_id ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    name        text not null,
    created_at  timestamptz not null default now()
);

create table agents (
    tenant_id      text not null references tenants (tenant_id) on delete cascade,
    agent_id       text not null check (agent_id ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    name           text not null,
    role           text not null,
    persona        text not null default '',
    system_prompt  text not null default '',
    model_group    text not null default 'fast' check (model_group in ('fast', 'quality')),
    fallback_reply text not null default
        'Sorry, I cannot answer right now. Please try again in a few minutes.',
    updated_at     timestamptz not null default now(),
    primary key (tenant_id, agent_id)
);

create table threads (
    tenant_id   text not null references tenants (tenant_id) on delete cascade,
    thread_id   text not null,
    agent_id    text not null,
    channel     text not null,
    created_at  timestamptz not null default now(),
    primary key (tenant_id, thread_id)
);

-- One row per inbound message: the primary key makes a redelivery a no-op.
create table message_turns (
    tenant_id      text not null,
    message_id     text not null,
    thread_id      text not null,
    agent_id       text not null,
    channel        text not null,
    sender         text not null,
    user_text      text not null,
    reply_text     text not null,
    model_group    text not null,
    model          text not null,
    fallback_used  boolean not null,
    degraded       boolean not null,
    usage          jsonb not null default '{}',
    workflow_id    text not null,
    created_at     timestamptz not null default now(),
    primary key (tenant_id, message_id),
    foreign key (tenant_id, thread_id) references threads (tenant_id, thread_id) on delete cascade
);
create index message_turns_thread on message_turns (tenant_id, thread_id, created_at);

-- Model registry: runs with metrics and artifacts, aliases pointing at runs,
-- and an append-only history of every alias move.
create table registry_runs (
    run_id           uuid primary key,
    tenant_id        text not null references tenants (tenant_id) on delete cascade,
    kind             text not null,              -- 'model', 'experiment', ...
    name             text not null,
    owner            text not null default 'user',  -- 'demo' rows belong to DemoCascade
    status           text not null default 'success',
    params           jsonb not null default '{}',
    metrics          jsonb not null default '{}',
    artifact_uri     text,
    artifact_sha256  text,
    artifact_size    bigint,
    workflow_id      text,
    workflow_run_id  text,
    created_at       timestamptz not null default now()
);
create index registry_runs_tenant on registry_runs (tenant_id, created_at);

create table registry_aliases (
    tenant_id   text not null references tenants (tenant_id) on delete cascade,
    alias       text not null,
    run_id      uuid references registry_runs (run_id) on delete set null,
    version     bigint not null default 1,
    updated_at  timestamptz not null default now(),
    primary key (tenant_id, alias)
);

create table registry_alias_history (
    id               bigserial primary key,
    tenant_id        text not null references tenants (tenant_id) on delete cascade,
    alias            text not null,
    from_run_id      uuid,
    to_run_id        uuid,
    reason           text not null,
    workflow_id      text,
    workflow_run_id  text,
    moved_at         timestamptz not null default now()
);
create index registry_alias_history_alias on registry_alias_history (tenant_id, alias, id);

-- Artifact bytes live in PostgreSQL by default (the "artifact store"); the
-- URI is the key and the hash is verified on every load.
create table registry_artifacts (
    tenant_id   text not null references tenants (tenant_id) on delete cascade,
    uri         text not null,
    sha256      text not null,
    data        bytea not null,
    created_at  timestamptz not null default now(),
    primary key (tenant_id, uri)
);

call konstruct_isolate_tenant(array[
    'tenants', 'agents', 'threads', 'message_turns', 'registry_runs',
    'registry_aliases', 'registry_alias_history', 'registry_artifacts'
]);

-- Agents that act: tools, the agent loop's transcript, bounded thread memory,
-- and per-tenant API keys for the HTTP gateway.

-- An agent lists the tools it may call (built-in names or the tenant's own
-- tools) and how many model steps one message may take.
alter table agents
    add column tools         text[] not null default '{}',
    add column max_steps     int not null default 8 check (max_steps between 1 and 32),
    add column history_turns int not null default 10 check (history_turns between 0 and 100),
    add column memory_tokens int not null default 2000 check (memory_tokens between 200 and 100000);

-- A tenant's tools: webhooks it defines, and its settings for the built-in
-- tools (approval, timeout). A webhook's secret is never stored: only the name
-- of the environment variable the worker reads it from.
create table tools (
    tenant_id          text not null references tenants (tenant_id) on delete cascade,
    name               text not null check (name ~ '^[a-zA-Z0-9_-]{1,64}$'),
    kind               text not null check (kind in ('builtin', 'webhook')),
    description        text not null default '',
    parameters         jsonb not null default '{"type": "object", "properties": {}}',
    url                text,
    secret_header      text,
    secret_env         text,
    requires_approval  boolean not null default false,
    timeout_s          double precision not null default 30 check (timeout_s > 0),
    approval_timeout_s double precision not null default 600 check (approval_timeout_s > 0),
    updated_at         timestamptz not null default now(),
    primary key (tenant_id, name),
    check (kind <> 'webhook' or url is not null)
);

-- Hosts the built-in http_request tool may reach, per tenant.
create table tenant_http_hosts (
    tenant_id  text not null references tenants (tenant_id) on delete cascade,
    host       text not null,
    primary key (tenant_id, host)
);

-- The inbound message as the agent loop reads it back at every step, so the
-- workflow's history carries ids, not the transcript.
create table inbound_messages (
    tenant_id   text not null references tenants (tenant_id) on delete cascade,
    message_id  text not null,
    thread_id   text not null,
    agent_id    text not null,
    channel     text not null,
    sender      text not null,
    user_text   text not null,
    workflow_id text not null,
    created_at  timestamptz not null default now(),
    primary key (tenant_id, message_id)
);

-- One row per model step of a message: what the model said (its text and the
-- tool calls it asked for, in the OpenAI format). A step taken again after a
-- crash finds its row and does not call the model twice.
create table agent_steps (
    tenant_id   text not null,
    message_id  text not null,
    step        int not null,
    assistant   jsonb not null,
    model_group text not null,
    model       text not null,
    usage       jsonb not null default '{}',
    created_at  timestamptz not null default now(),
    primary key (tenant_id, message_id, step),
    foreign key (tenant_id, message_id) references inbound_messages (tenant_id, message_id)
        on delete cascade
);

-- One row per tool call; the call id (the model's) is the idempotency key.
create table tool_calls (
    tenant_id   text not null,
    message_id  text not null,
    call_id     text not null,
    step        int not null,
    position    int not null,
    tool        text not null,
    arguments   jsonb not null,
    status      text not null check (status in ('pending', 'awaiting_approval', 'ok', 'error',
                                                'rejected', 'timed_out')),
    result      text,
    attempts    int not null default 0,
    decided_by  text,
    workflow_id text not null,
    created_at  timestamptz not null default now(),
    finished_at timestamptz,
    primary key (tenant_id, message_id, call_id),
    foreign key (tenant_id, message_id) references inbound_messages (tenant_id, message_id)
        on delete cascade
);
create index tool_calls_awaiting on tool_calls (tenant_id) where status = 'awaiting_approval';

-- Turns in the order they were stored, and a rolling summary per thread of the
-- turns up to `through_seq`.
alter table message_turns
    add column seq        bigint generated always as identity,
    add column steps      int not null default 1,
    add column tool_calls int not null default 0;
create index message_turns_thread_seq on message_turns (tenant_id, thread_id, seq);

create table thread_summaries (
    tenant_id    text not null,
    thread_id    text not null,
    summary      text not null,
    through_seq  bigint not null,
    turns        int not null,
    updated_at   timestamptz not null default now(),
    primary key (tenant_id, thread_id),
    foreign key (tenant_id, thread_id) references threads (tenant_id, thread_id) on delete cascade
);

-- API keys: only a SHA-256 of the key is kept. The gateway learns a key's
-- tenant through `konstruct_key_tenant`, which runs as the table's owner (the
-- table's policy is enabled, not forced, so its owner reads past it); the
-- application role sees only its own tenant's keys.
create table api_keys (
    key_id       text primary key,
    tenant_id    text not null references tenants (tenant_id) on delete cascade,
    key_hash     text not null unique,
    label        text not null default '',
    created_at   timestamptz not null default now(),
    revoked_at   timestamptz,
    last_used_at timestamptz
);

create function konstruct_key_tenant(hash text)
    returns table (tenant_id text, key_id text)
    language plpgsql volatile security definer set search_path = public
as $$
begin
    -- A busy key costs no write: last_used_at moves at most once a minute.
    update api_keys k set last_used_at = now()
        where k.key_hash = hash and k.revoked_at is null
        and (k.last_used_at is null or k.last_used_at < now() - interval '1 minute');
    return query
        select k.tenant_id, k.key_id from api_keys k
        where k.key_hash = hash and k.revoked_at is null;
end
$$;

call konstruct_isolate_tenant(array[
    'tools', 'tenant_http_hosts', 'inbound_messages', 'agent_steps', 'tool_calls', 'thread_summaries'
]);

-- Not forced: `konstruct_key_tenant` (the owner) finds a key's tenant across tenants.
call konstruct_isolate_tenant(array['api_keys'], force => false);

-- Per-key request and token limits at the gateway (issue 23): optional `rpm` and
-- `tpm` on a key, enforced across every gateway process by a token bucket per key
-- in PostgreSQL (as the provider schedule is): each bucket holds up to a minute's
-- allowance and refills continuously, so a key may burst its minute and then
-- goes at its rate. A request takes one from `requests_left`; its tokens are
-- taken from `tokens_left` once its answer says how many it used (the bucket may
-- go below zero: the next requests wait for it to refill).
alter table api_keys add column rpm integer check (rpm > 0);
alter table api_keys add column tpm integer check (tpm > 0);

create table key_buckets (
    tenant_id     text not null references tenants (tenant_id) on delete cascade,
    key_id        text primary key references api_keys (key_id) on delete cascade,
    requests_left double precision not null,
    tokens_left   double precision not null,
    updated_at    timestamptz not null
);
call konstruct_isolate_tenant(array['key_buckets']);

-- The key's tenant, id and limits in the one call the gateway makes per request.
drop function konstruct_key_tenant(text);
create function konstruct_key_tenant(hash text)
    returns table (tenant_id text, key_id text, rpm integer, tpm integer)
    language plpgsql volatile security definer set search_path = public
as $$
begin
    -- A busy key costs no write: last_used_at moves at most once a minute.
    update api_keys k set last_used_at = now()
        where k.key_hash = hash and k.revoked_at is null
        and (k.last_used_at is null or k.last_used_at < now() - interval '1 minute');
    return query
        select k.tenant_id, k.key_id, k.rpm, k.tpm from api_keys k
        where k.key_hash = hash and k.revoked_at is null;
end
$$;

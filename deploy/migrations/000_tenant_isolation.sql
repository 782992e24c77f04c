-- Row-level security for tenant tables, written once: each migration that adds
-- tenant tables calls `konstruct_isolate_tenant` on them. The policy admits the
-- rows whose tenant_id is the transaction-local setting `konstruct.tenant_id`;
-- FORCE makes it bind the table owner too (`force => false` leaves the owner
-- past it, for a table a security-definer function must read across tenants).
-- Numbered 000 so a fresh database defines it before 001 uses it; a database
-- migrated before it existed just gains the procedure.

create or replace procedure konstruct_isolate_tenant(tables text[], force boolean default true)
    language plpgsql
as $$
declare
    t text;
begin
    foreach t in array tables
    loop
        execute format('alter table %I enable row level security', t);
        if force then
            execute format('alter table %I force row level security', t);
        end if;
        execute format(
            'create policy tenant_isolation on %I
                 using (tenant_id = current_setting(''konstruct.tenant_id'', true))
                 with check (tenant_id = current_setting(''konstruct.tenant_id'', true))', t);
    end loop;
end
$$;

-- Only migrations (the owner) call it; the application role has no use for it.
revoke execute on procedure konstruct_isolate_tenant(text[], boolean) from public;

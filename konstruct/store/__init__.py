"""Every SQL statement Konstruct runs, one module per table family.

- `agents`: tenants, agents and message turns
- `registry`: registry runs, aliases and their history, the artifact store
- `experiments`: experiments, their items and results, summaries
- `providers`: per-provider adaptive rates and circuit breakers
- `demo`: demo sessions

Tenant data is only read or written inside `konstruct.db.tenant_transaction`,
so row-level security scopes each statement to one tenant. Nothing here talks
to Temporal or to a provider.
"""

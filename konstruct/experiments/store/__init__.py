"""The experiments' SQL, one module per table family; tenant data only inside `db.tenant_transaction`."""

"""The experiments' SQL, one module per table family.

Every public function takes a connection first and the caller owns the transaction
(`db.tenant_transaction(pool, tenant)`, which row-level security needs); the one
named exception, `budgets.reserve`, takes the pool because a refused reservation
rolls back while its refusal must still be recorded.
"""

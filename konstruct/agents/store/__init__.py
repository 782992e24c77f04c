"""The agents' SQL, one module per table family.

Every public function takes a connection first and the caller owns the transaction
(`db.tenant_transaction(pool, tenant)`, which row-level security needs); the
named exceptions, `knowledge.add_document` and `knowledge.search`, take the pool
because no transaction may wait on their embedding calls.
"""

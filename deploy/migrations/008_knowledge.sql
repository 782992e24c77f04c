-- requires-extension: vector (pgvector) for knowledge_search
--
-- A per-tenant knowledge base: documents, cut into chunks, each chunk with its
-- embedding (pgvector). `konstruct migrate` skips this file, and records it as
-- not applied, on a server without the `vector` extension; it applies once the
-- extension is installed and `konstruct migrate` runs again.

create extension if not exists vector;

create table knowledge_documents (
    tenant_id  text not null references tenants (tenant_id) on delete cascade,
    doc_id     text not null,
    title      text not null,
    source     text not null default '',
    sha256     text not null,
    chunks     int not null check (chunks >= 0),
    created_at timestamptz not null default now(),
    primary key (tenant_id, doc_id)
);

-- `vector` without a fixed dimension, so that any embedding model fits (and a
-- tenant can move to another one). The price: no ANN index (ivfflat and hnsw
-- need a fixed dimension), so a search is an exact scan of the tenant's chunks
-- of that dimension: `where dims = <the query's> order by embedding <=> query`.
-- An index per dimension (an expression index on embedding::vector(N) with
-- `where dims = N`) can be added once the corpus is large enough to need it.
create table knowledge_chunks (
    tenant_id  text not null,
    doc_id     text not null,
    chunk_no   int not null check (chunk_no >= 0),
    content    text not null,
    embedding  vector not null,
    dims       int not null,
    primary key (tenant_id, doc_id, chunk_no),
    foreign key (tenant_id, doc_id) references knowledge_documents (tenant_id, doc_id)
        on delete cascade,
    check (dims = vector_dims(embedding))
);

call konstruct_isolate_tenant(array['knowledge_documents', 'knowledge_chunks']);

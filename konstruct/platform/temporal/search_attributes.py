"""The search attributes every Konstruct workflow sets (registered by the stack)."""

from temporalio.common import SearchAttributeKey, SearchAttributePair, TypedSearchAttributes

TENANT = SearchAttributeKey.for_keyword("KonstructTenant")
KIND = SearchAttributeKey.for_keyword("KonstructKind")
STATUS = SearchAttributeKey.for_keyword("KonstructStatus")

# Name -> type, as `temporal server start-dev --search-attribute` takes them.
SEARCH_ATTRIBUTES = {key.name: "Keyword" for key in (TENANT, KIND, STATUS)}


def start_search_attributes(tenant_id: str) -> dict[str, str]:
    """What a message's starter sets (by name), so HandleMessage need not upsert them."""
    return {TENANT.name: tenant_id, KIND.name: "message", STATUS.name: "running"}


def message_search_attributes(tenant_id: str) -> TypedSearchAttributes:
    """The same, as `start_workflow(search_attributes=...)` takes them."""
    return TypedSearchAttributes(
        [
            SearchAttributePair(TENANT, tenant_id),
            SearchAttributePair(KIND, "message"),
            SearchAttributePair(STATUS, "running"),
        ]
    )

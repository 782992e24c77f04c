"""The search attributes every Konstruct workflow sets (registered by the stack)."""

from temporalio.common import SearchAttributeKey

TENANT = SearchAttributeKey.for_keyword("KonstructTenant")
KIND = SearchAttributeKey.for_keyword("KonstructKind")
STATUS = SearchAttributeKey.for_keyword("KonstructStatus")

# Name -> type, as `temporal server start-dev --search-attribute` takes them.
SEARCH_ATTRIBUTES = {key.name: "Keyword" for key in (TENANT, KIND, STATUS)}

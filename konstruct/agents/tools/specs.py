"""The built-in tools' function specs: what the model is told each tool does and takes."""

from __future__ import annotations

BUILTIN_TOOLS: dict[str, dict] = {
    "calculator": {
        "name": "calculator",
        "description": (
            "Evaluate an arithmetic expression exactly. Supports numbers, parentheses, "
            "unary + and -, and + - * / // % ** (exponent at most 100). "
            "Example: (3 + 4) * 2"
        ),
        "parameters": {
            "type": "object",
            "properties": {
                "expression": {
                    "type": "string",
                    "description": "The expression, e.g. '2 * (3 + 4) / 7'.",
                    "maxLength": 500,
                }
            },
            "required": ["expression"],
            "additionalProperties": False,
        },
    },
    "http_request": {
        "name": "http_request",
        "description": (
            "Make an HTTP GET or POST request to a host on this tenant's allow-list and "
            "return 'HTTP <status>' followed by the response body (cut at a size limit). "
            "Redirects are not followed: a redirect answer returns its Location."
        ),
        "parameters": {
            "type": "object",
            "properties": {
                "method": {"type": "string", "enum": ["GET", "POST"]},
                "url": {"type": "string", "description": "An http:// or https:// URL."},
                "body": {"type": "string", "description": "The request body (POST only)."},
                "headers": {
                    "type": "object",
                    "description": (
                        "Extra request headers; Host, Authorization and Cookie are not allowed."
                    ),
                    "additionalProperties": {"type": "string"},
                },
            },
            "required": ["method", "url"],
            "additionalProperties": False,
        },
    },
    "knowledge_search": {
        "name": "knowledge_search",
        "description": (
            "Search this agent's knowledge base and return the passages nearest in "
            "meaning to the query, best first."
        ),
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string", "description": "What to look for."},
                "k": {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": 10,
                    "description": "How many passages to return (default 5).",
                },
            },
            "required": ["query"],
            "additionalProperties": False,
        },
    },
}

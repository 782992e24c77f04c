"""Temporal wiring, defined once: plugin, interceptors, client, payload codec and its server, search attributes, activity options, input validation and the saga."""

"""Activities, grouped by the system they touch."""

"""The platform every feature stands on: errors, names, PostgreSQL, telemetry, settings sections and the Temporal wiring. It imports no feature."""

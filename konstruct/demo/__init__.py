"""DemoCascade's domain: forecasting, what the demo says, payload models and SQL."""

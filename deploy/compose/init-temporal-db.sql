-- Temporal's own databases beside Konstruct's (auto-setup creates their schemas).
create database temporal;
create database temporal_visibility;

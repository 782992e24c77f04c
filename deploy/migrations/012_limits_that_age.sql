-- When a provider last answered (a success or a 429), on the database's clock:
-- after an idle gap what its row learned is only a starting point
-- (konstruct/providers/control.py, `idle_reset_s`).
alter table provider_limits add column last_answer_at float8;

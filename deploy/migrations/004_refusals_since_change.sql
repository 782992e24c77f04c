-- The 429s counted since the rate last changed: with the successes, they tell
-- whether calls came at about the rate (the provider's limit is what it took)
-- or far fewer did (a burst or a retry, not a new limit).
alter table provider_limits
    add column throttled_since_change integer not null default 0;

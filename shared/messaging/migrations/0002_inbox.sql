-- Events a consumer has already dealt with, recorded in the same transaction
-- as their effect: a redelivered event finds its row and is skipped.
CREATE TABLE inbox (
    consumer     TEXT        NOT NULL,
    event_id     UUID        NOT NULL,
    -- 'handled', or 'dead_lettered' when it went to the dead-letter topic.
    outcome      TEXT        NOT NULL,
    processed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);

-- The write side: every order is the stream of its events. An event is
-- never updated or deleted.
CREATE TABLE events (
    -- Order of insertion across all streams; used to replay everything.
    global_position BIGINT      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    stream_id       UUID        NOT NULL,
    -- Position within the stream, from 1 without gaps.
    version         BIGINT      NOT NULL CHECK (version > 0),
    event_id        UUID        NOT NULL UNIQUE,
    event_type      TEXT        NOT NULL,
    schema_version  INT         NOT NULL,
    -- The whole event envelope (protobuf), payload included.
    envelope        BYTEA       NOT NULL,
    recorded_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- Optimistic concurrency: two writers appending at the same expected
    -- version collide here, and the second gets a conflict.
    CONSTRAINT events_stream_version UNIQUE (stream_id, version)
);

-- The purge job deletes inbox rows past their retention, oldest first
-- (`retention.rs`): this index finds each batch without scanning the rest.
CREATE INDEX inbox_processed_at ON inbox (processed_at);

-- A request that finds a charge key's lease held waits until it changes:
-- announce every lease freed or taken over, with the key, so the waiters
-- of every replica read the key again at once instead of polling it.
CREATE FUNCTION charge_claims_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(TG_TABLE_SCHEMA || '.charge_claims', NEW.charge_key);
    RETURN NULL;
END
$$;
CREATE TRIGGER charge_claims_notify
    AFTER UPDATE OF lease_holder ON charge_claims
    FOR EACH ROW WHEN (OLD.lease_holder IS NOT NULL AND OLD.lease_holder IS DISTINCT FROM NEW.lease_holder)
    EXECUTE FUNCTION charge_claims_notify();

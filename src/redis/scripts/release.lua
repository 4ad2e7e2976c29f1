-- Give back everything one reservation holds on the levels of one hash tag (the
-- request did not happen). KEYS: holds zset, the record, the commit marker.
-- ARGV: id, record_base. A reservation already committed or expired is a no-op.

purge(KEYS[1], ARGV[2])
release_record(KEYS[2], KEYS[1], ARGV[1])
return 1

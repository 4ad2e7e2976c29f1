-- Give back everything one reservation holds on the levels of one hash tag (the
-- request did not happen). KEYS: holds zset, the record, the commit marker, the tag's
-- flags. ARGV: id, record_base. A reservation already committed or expired is a no-op.

purge(KEYS[1], ARGV[2], KEYS[4])
release_record(KEYS[2], KEYS[1], ARGV[1], KEYS[4])
return 1

//! Redis backend under faults: a crashed instance, Redis killed and restarted, bad data.

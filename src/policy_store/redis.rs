//! The policy document in Redis (filled in below).

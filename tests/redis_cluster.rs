//! Redis backend on a real 3-master Redis Cluster and many instances at once.

"""nodi.storage: the append-only segmented log, its indexes, recovery, retention
and the LMDB metadata store. Knows nothing of the network."""

"""A Patroni-managed PostgreSQL cluster for tests and the chaos suite
(docs/cluster.md)."""

"""The engine: a batch of records in; scores, alerts and dead letters out. No I/O."""

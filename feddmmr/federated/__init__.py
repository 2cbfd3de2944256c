"""The federated engine: the client's local update, the server's aggregation and optimizer, the worker pool."""

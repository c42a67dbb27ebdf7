"""What every route shares: the error envelope, middleware, auth, logging, metrics, shutdown, route table."""

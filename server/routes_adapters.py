"""The old address of `server.admin.adapters`, kept while load_tests/local_server.py still imports it."""

from server.admin.adapters import adapter_routes

__all__ = ["adapter_routes"]

"""nodi.broker: the server, its wire protocol and the Python client (not yet built)."""

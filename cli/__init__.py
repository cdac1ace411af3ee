"""nodi.cli: the `nodi` command."""

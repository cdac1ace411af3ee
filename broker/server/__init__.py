"""nodi.broker.server.server: the asyncio server: the listener and its connections (server.py), the dispatch
table (service.py), Reply and the error mapping (reply.py), stream groups, queue groups,
publish dedup, inboxes, the compaction service, metrics, status and the configuration.
"""

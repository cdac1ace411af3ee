"""nodi.broker.protocol.connection: nodi's wire protocol, shared by the server and the client: error codes, limits,
the message schema and messages, frames, the sans-IO connection, reserved headers and
the queue settings both sides use. Imports nothing from storage but the record codec
(its limits) and storage's errors.
"""

"""nodi.broker.protocol.connection: nodi's wire protocol, shared by the server and the client: error codes, limits,
the message schema and messages, frames, the sans-IO connection, reserved headers and
the queue settings both sides use. Imports nothing from storage but the record codec
(its limits), storage's errors and the topic settings' declaration
(nodi.storage.topic_settings, from which messages.TopicSettings is derived).
"""

"""The Kafka-protocol listener: Kafka's clients on nodi's logs (issue 13).

connection.py is the sans-IO codec (bytes in, requests out; responses in, bytes out),
apis.py and schema.py the message layouts, handlers.py and groups.py what each request
does with the broker's services, listener.py the asyncio loop around them.
"""

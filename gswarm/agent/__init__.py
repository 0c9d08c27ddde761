"""The agent: one process per node that holds a websocket to the head and does the work."""

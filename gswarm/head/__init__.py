"""The head: one aiohttp server with the REST API, the agent socket and the event socket."""

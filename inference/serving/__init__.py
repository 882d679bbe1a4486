"""The serving layer between the routes and the engine, in the shape of vLLM's ``entrypoints/openai``: the router
(``inference.routes``: paths, OpenAPI metadata, the call), the protocol (``inference.schemas``: bodies and response
models) and one serving module per feature here (``chat``, ``completions``, ``generate``, ``models``).

A generation feature is one ``start`` / ``respond`` pair. ``start`` refuses what the feature does not support,
acquires the model (loaded on demand), renders and encodes the prompt, turns the request's knobs into sampling
parameters and hands the request to the model's engine (``generation.start_generation``). ``respond`` collects the
answer into the feature's response model, or streams the feature's chunks through the one SSE adapter
(``answer.collect_or_stream``).
"""

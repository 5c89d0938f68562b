"""`digits serve`: trained runs answering HTTP on Ray Serve, with a page to draw a digit on.

`bodies.py` reads and checks request bodies, `app.py` is the Serve deployment (the model(s)
loaded once per replica through scoring/ensemble.py, concurrent requests batched), `server.py`
starts, swaps and stops it. Imports scoring, runtime, storage and the base modules; only the CLI
imports it.
"""

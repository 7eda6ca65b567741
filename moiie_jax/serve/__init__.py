"""The web chat: `python -m moiie_jax.serve --checkpoint DIR` (session.py: the engine; routing_view.py: the
routing view's HTML and heat map; app.py: the Gradio page and the JSON route)."""

"""Serving: engines with hot-swap, the chat service, the HTTP API and the Gradio UI."""

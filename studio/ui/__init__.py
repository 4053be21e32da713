"""The Gradio front end: the only package (with app.py) that imports gradio."""
from studio.ui.app import build_demo

__all__ = ["build_demo"]

"""MedicalGPT-compatible entry point for the chat-template registry (implementation: medgpt/templates.py)."""
from medgpt.templates import *  # noqa: F401,F403
from medgpt.templates import __all__, conv_templates  # noqa: F401

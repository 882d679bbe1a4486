"""Model artifacts that both the worker (at publish and base-model preparation) and inference (at load) need:
the GGUF export and llama.cpp's quantiser, the golden-prompt reference of a model, and the folder of serving
files written next to a published model.

This package imports torch. It may be imported by ``worker`` and ``inference`` only, never by ``api`` or
``core`` (``tests/test_architecture.py`` holds that rule), and it imports only ``core`` and itself.
"""

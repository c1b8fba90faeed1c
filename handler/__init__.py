"""The TorchServe edge: skin_handler.py is the handler packed into each .mar (archive.sh)."""

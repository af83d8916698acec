from ebft.cli import entrypoint

entrypoint()

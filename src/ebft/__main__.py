from ebft.entry import entrypoint

entrypoint()

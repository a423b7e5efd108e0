"""The workbench SDK: a client that submits artifacts and follows them over the broker."""

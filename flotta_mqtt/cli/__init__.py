"""The `flotta-mqtt` command: thin commands that parse options and start or show a part."""

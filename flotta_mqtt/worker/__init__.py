"""The edge worker: an agent that takes jobs off the bus, and the runners that run them."""

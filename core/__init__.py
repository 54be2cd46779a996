"""The bottom layer, imported by every other: the records the layers exchange, the settings and
their defaults, the data dir's layout and a model version's files. It imports nothing of
tuneloop's own."""

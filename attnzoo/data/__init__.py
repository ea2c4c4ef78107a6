"""Data that ships with attnzoo (written for it, never downloaded): :mod:`attnzoo.data.sentences`."""

"""Models: the embedding front end, the feature-interaction layers (``layers``), teachers and students."""

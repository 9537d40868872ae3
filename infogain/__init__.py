"""Information-gain reward: how much a context raises a generator's semantic certainty."""

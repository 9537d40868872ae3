"""Information-gain reward (seed 000): how much a context raises a generator's semantic certainty."""

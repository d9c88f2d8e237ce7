"""scribe chaos: fault injection that proves nothing is lost."""

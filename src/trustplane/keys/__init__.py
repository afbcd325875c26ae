"""Token-signing keys: generation, encryption at rest, the next -> active -> retired -> removed cycle."""

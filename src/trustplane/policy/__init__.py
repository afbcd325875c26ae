"""The policy decision point: Cedar policies as versioned bundles, decisions recorded, simulation."""

"""The entity directory: legal entity names for the LEIs trustplane shows to people."""

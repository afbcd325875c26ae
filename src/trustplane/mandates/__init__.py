"""Mandates: durable, versioned records of who authorised which client to do what, under which
legal basis. Every delegated token points back to one (``mandate: {id, version}``)."""

"""The operator and compliance console at ``/console`` (docs/console.md): server-rendered pages over
the services, signed in through trustplane's own authorization code flow."""

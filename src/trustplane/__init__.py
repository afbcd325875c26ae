"""trustplane: the identity control plane for institutional trade workflows."""

__version__ = "0.1.0"

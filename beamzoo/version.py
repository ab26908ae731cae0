"""beamzoo's version (what bundles record, what the server reports)."""
__version__ = "0.3.0"

"""distplan.service."""

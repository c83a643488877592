"""distplan.tracer."""

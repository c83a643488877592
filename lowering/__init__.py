"""distplan.lowering."""

"""distplan.planner."""

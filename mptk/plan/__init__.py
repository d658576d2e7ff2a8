"""mptk-plan: layout planner."""

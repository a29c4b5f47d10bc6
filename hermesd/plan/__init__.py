"""Planning as plain arithmetic: budgets, workloads, profiles, the Pipeline Planner and saved plans.

Nothing here runs a model: the engine takes a plan, and the profiler (``hermesd.profiling``) runs the
engine to produce the profile this package reasons from.
"""

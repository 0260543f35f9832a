"""Built-in schedules, installed as ``pipesched.schedules``.

Each module is one schedule and imports only the plug-in contract
(:mod:`pipesched.plan.schedule`). They are found through the entry-point group
``pipesched.schedules`` like any third-party schedule.
"""

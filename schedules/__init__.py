"""Built-in schedules, installed as ``pipesched.schedules``.

Each module is one schedule and imports only :mod:`pipesched.plan` (the plug-in
contract, and the simulation-based tuning of :mod:`pipesched.plan.greedy`), so
none needs torch; ``dualpipe_v`` also reuses ``zb_v``'s order below 2p
micro-batches. They are found through the entry-point group
``pipesched.schedules`` like any third-party schedule.
"""

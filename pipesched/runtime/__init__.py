"""How one process runs a plan: step runner, event loop, worker threads, task bodies, memory.

Imports the plan and observe layers below it, never the distributed or cli layers above.
"""

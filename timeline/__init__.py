"""What both engines emit and how it is read: the timeline of a run (events.py), the metrics
computed from it (metrics.py) and its Gantt chart (gantt.py). The simulator (sim/) and the
executor (executor/) both import this package; it imports neither."""

"""What ran: step reports, timeline analysis, exports (Chrome trace, Gantt), the JSON-lines log."""

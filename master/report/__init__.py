"""What a user reads: status, logs, collect, progress lines and summaries, the dashboard with its run page, timeline and GPU history."""

"""What the daemon tells the outside: logs (journald priorities), Prometheus metrics,
sd_notify, and the event-loop lag monitor."""

"""Operating the daemon: health and readiness, metrics, systemd, logs, model reload."""

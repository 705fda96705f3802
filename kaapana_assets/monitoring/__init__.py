"""Network monitoring: every site's aggregates collected at the hub over the federation
channel (small cells suppressed at the site), merged into one Delta table with a network
total, and served to Prometheus with Dagster's own health figures."""

"""Federated nnU-Net on the federation's transport (kaapana_assets/federation/): only model
updates, counts and metrics leave a site; the hub verifies and aggregates them with Flower's
strategies. Plain modules: aggregation, privacy (local DP), accounting (its ε, the budget),
fingerprint, site (site-side steps), hub (plan, rounds), partitions, strategy (the Strategy
enum). steps.py registers the `plan` and `round` steps (their names: step_names.py) with the
transport (hub and site handlers; the site's Dagster wiring).
assets.py wires the hub's and the site's assets into Dagster."""

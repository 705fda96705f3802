"""Federated nnU-Net: only model updates leave a site, sealed per site; the hub verifies
and aggregates them. Plain modules: exchange (sealing), payload (what may leave),
aggregation, guard, fingerprint, store (the exchange folder), site (site-side steps),
hub (plan, rounds). assets.py wires them into Dagster."""

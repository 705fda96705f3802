"""Federated nnU-Net on Flower: only model updates, counts and metrics leave a site,
signed with the site's own key; the hub verifies and aggregates them with Flower's
strategies. Plain modules: channel (message format, signing), payload (what may leave),
aggregation, privacy (local DP), guard, fingerprint, store (each side's own federation
folder), sites (the federation file), site (site-side steps), hub (plan, rounds),
runs (start a Flower run), superlink (Flower's processes and credentials).
Flower entry points: serverapp (hub), clientapp (site; the site's Dagster wiring).
assets.py wires the hub's and the site's assets into Dagster."""

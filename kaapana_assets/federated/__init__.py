"""Federated nnU-Net: only model updates leave a site, sealed per site; the hub verifies
and aggregates them. This package holds the exchange format, aggregation and the guard
on what may leave a site; rounds as assets build on it."""

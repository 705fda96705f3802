"""The names federated training's steps go by on the federation's transport: steps.py
registers its handlers under them, assets.py asks the transport to run them. A light module:
the code location loads the assets without Flower."""

PLAN_STEP = "plan"  # every site's fingerprint → the experiment's one plan and initial network
ROUND_STEP = "round"  # local updates → the aggregate → the global model scored at every site
EVALUATION_STEP = "evaluation"  # models to every site → each site's aggregates over its held-out cohort
BASELINE_STEP = "baseline"  # consenting sites train a local-only baseline; its weights come to the hub

"""Every sensor of the code location, thin: what to request is planned in the domain modules
(incoming_studies, cohort_definitions, model_promotion, segmentation_automation,
federated_round_chain); definitions.py registers them."""

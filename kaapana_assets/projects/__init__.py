"""Research projects: which series belong to which project (Kaapana's data separation).

Every read of patient data on behalf of a user or of a project's cohort, evaluation or
experiment goes through `membership`: the series of the projects it may see, at one version of
`series_projects` so a cohort version stays reproducible.
"""

"""The stages, without Ray. Each module has the same three verbs: plan its work units (each keyed by everything
it depends on upstream), compute one unit (a worker class that loads the model once), and finish its tables.
`cad_ray.distributed` runs the units on Ray actors or in this process.

    attribution  -> scores/, neurons/, layers/
    validation   -> validation/, validation_summary/, localization/, overlap/
    evaluation   -> evaluation/, evaluation_summary/, edits/
    report       -> report.html
"""

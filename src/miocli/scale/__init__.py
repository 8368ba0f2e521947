"""Past one machine: a task mapped over a Ray Dataset, one whole MIO pipeline per worker (`ray`).

May import: serve, core, model, errors, quiet.
"""

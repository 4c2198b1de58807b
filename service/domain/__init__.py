"""Domain services: datasets, models, jobs. They raise service.core.errors and know nothing of HTTP."""

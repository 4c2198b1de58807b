"""The core the worker may import: settings, database, job lifecycle, references, queue, artifact storage. No HTTP."""

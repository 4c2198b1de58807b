"""What `distillery-server` runs besides the API and the worker: the demo and the real data it fetches.

The command line is the one floor that may reach every other (it starts the API, a worker, the engine);
nothing imports it back."""

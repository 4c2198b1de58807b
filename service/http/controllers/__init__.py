"""Litestar controllers, one per resource; thin: parse, call a domain service, shape the response."""

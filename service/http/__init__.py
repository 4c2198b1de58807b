"""HTTP plumbing shared by every resource: auth, problem responses, pagination, idempotency, schemas."""

"""scribe: record, spool durably, upload."""
